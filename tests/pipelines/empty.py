"""A module that defines no DataJointWorker (config tests)."""

VALUE = 1
