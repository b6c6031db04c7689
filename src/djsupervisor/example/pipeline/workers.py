"""Worker definitions for the example pipeline (targets for djsupervisor.toml)."""

import os

from djsupervisor import DataJointWorker

from .tables import PREFIX, Recording, Spikes, Summary

sleep = float(os.environ.get("DJS_EXAMPLE_SLEEP_SECONDS", "5"))

#: The fast steps, in pipeline order.
standard = DataJointWorker(
    "standard", f"{PREFIX}_workers", db_prefix=[PREFIX], sleep_duration=sleep, max_sleep_duration=60
)
standard(Recording)
standard(Spikes)

#: The slow analysis, run by its own pool.
analysis = DataJointWorker(
    "analysis", f"{PREFIX}_workers", db_prefix=[PREFIX], sleep_duration=sleep, max_sleep_duration=60
)
analysis(Summary)
