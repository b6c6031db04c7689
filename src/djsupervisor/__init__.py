"""djsupervisor: run DataJoint pipeline workers in production.

`DataJointWorker` is the in-process bounded cycle loop; `djsupervisor start` keeps pools of them alive.
"""

import warnings

# DataJoint 2.x warns on every MariaDB connect that support is best-effort. Workers connect and reconnect
# for months; the notice goes to our debug log once instead (see connection.note_server), as README says.
warnings.filterwarnings("ignore", message="MariaDB is not officially supported", category=UserWarning)

from .events import Activity, CycleSummary, ProcessCounts, WorkerEvent
from .worker import DataJointWorker

__version__ = "0.1.0"

__all__ = ["Activity", "CycleSummary", "DataJointWorker", "ProcessCounts", "WorkerEvent", "__version__"]
