"""datajoint-utilities' ``dj_worker``, on djsupervisor: a lab's worker module moves over by one changed import.

Lab workflows import ``DataJointWorker``, ``WorkerLog``, ``ErrorLog`` and ``parse_args`` from
``datajoint_utilities.dj_worker`` (``is_djtable`` from its ``worker_schema``, ``get_workflow_operation_overview``
from its ``utils``). The two packages cannot be installed side by side (DataJoint < 2 against >= 2.3), so this
package answers to the same names, submodules included::

    sed -i 's/datajoint_utilities.dj_worker/djsupervisor.dj_worker/' workflow/worker.py

and the module's workers are djsupervisor workers: its own runner (``python -m workflow.worker standard_worker
-d 3600``) keeps working, and ``djsupervisor start`` runs them as they are (MIGRATING.md).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import datajoint as dj

from djsupervisor.dj_worker.key_source import get_incomplete_key_source_sql, get_key_source_count, get_workers_progress
from djsupervisor.dj_worker.utils import get_workflow_operation_overview
from djsupervisor.dj_worker.worker import DataJointWorker, UpstreamSemanticsWarning
from djsupervisor.dj_worker.worker_schema import ErrorLog, RegisteredWorker, WorkerLog, is_djparttable, is_djtable

__all__ = [
    "DataJointWorker",
    "ErrorLog",
    "RegisteredWorker",
    "UpstreamSemanticsWarning",
    "WorkerLog",
    "get_incomplete_key_source_sql",
    "get_key_source_count",
    "get_workers_progress",
    "get_workflow_operation_overview",
    "is_djparttable",
    "is_djtable",
    "logger",
    "parse_args",
]

#: DataJoint's logger, which datajoint-utilities exports under this name. djsupervisor itself logs with loguru.
logger = dj.logger


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_args(args: Sequence[str]) -> argparse.Namespace:
    """A worker runner's command line, as datajoint-utilities parses it: ``worker_name``, ``-d/--duration``
    and ``-s/--sleep`` (seconds; None when not given), ``-v``/``-vv`` (``loglevel`` INFO/DEBUG)."""
    parser = argparse.ArgumentParser(description="Run a DataJoint worker.", formatter_class=_HelpFormatter)
    parser.add_argument("worker_name", help="Select the worker to run", type=str)
    parser.add_argument(
        "-d", "--duration", dest="duration", help="Run duration of the entire process", type=int, metavar="INT"
    )
    parser.add_argument(
        "-s", "--sleep", dest="sleep", help="Sleep time between subsequent runs", type=int, metavar="INT"
    )
    parser.add_argument(
        "-v", "--verbose", dest="loglevel", help="Set loglevel to INFO", action="store_const", const=logging.INFO
    )
    parser.add_argument(
        "-vv",
        "--very-verbose",
        dest="loglevel",
        help="Set loglevel to DEBUG",
        action="store_const",
        const=logging.DEBUG,
    )
    return parser.parse_args(args)
