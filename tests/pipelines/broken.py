"""A module that cannot be imported (config tests)."""

raise RuntimeError("this pipeline is broken")
