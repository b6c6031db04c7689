"""djsupervisor: run DataJoint pipeline workers in production.

`DataJointWorker` is the in-process bounded cycle loop; `djsupervisor start` keeps pools of them alive.
The names below are imported on first use, so that `djsupervisor` commands that need no DataJoint (status,
stop, ...) start fast and quietly.
"""

import warnings

# DataJoint 2.x warns on every MariaDB connect that support is best-effort. Workers connect and reconnect
# for months; the notice goes to our debug log once instead (see connection.note_server), as README says.
warnings.filterwarnings("ignore", message="MariaDB is not officially supported", category=UserWarning)

__version__ = "0.1.0"

__all__ = ["Activity", "CycleSummary", "DataJointWorker", "ProcessCounts", "WorkerEvent", "__version__"]


def __getattr__(name: str):
    if name == "DataJointWorker":
        from djsupervisor.worker.loop import DataJointWorker

        return DataJointWorker
    if name in ("Activity", "CycleSummary", "ProcessCounts", "WorkerEvent"):
        from djsupervisor.worker import events

        return getattr(events, name)
    raise AttributeError(f"module 'djsupervisor' has no attribute {name!r}")
