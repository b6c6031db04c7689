"""A lab's worker module, written the way public DataJoint workflows write their ``workflow/worker.py`` for
datajoint-utilities' dj_worker, with the one import line changed (``datajoint_utilities.dj_worker`` →
``djsupervisor.dj_worker``) and nothing else of the worker code touched.

Its own runner runs it (``python -m pipelines.lab_worker standard_worker -d 5 -s 1``), and so does
``djsupervisor start`` with targets ``pipelines.lab_worker:standard_worker`` and ``...:cube_worker``. The
pipeline is `pipelines.lab` in ``<DJS_TEST_PREFIX>_pipe``; the worker schema is ``<DJS_TEST_PREFIX>_workerlog``.
A Source row with a negative value is what `auto_check_sources` logs as an exception instead of raising.
"""

import logging
import os
import sys

import datajoint as dj

from djsupervisor.dj_worker import DataJointWorker, ErrorLog, WorkerLog, parse_args

from .lab import declare

_logger = logging.getLogger(__name__)
logger = dj.logger

db_prefix = os.environ["DJS_TEST_PREFIX"] + "_"
lab = declare(db_prefix + "pipe")  # a lab's module does `from workflow.pipeline import ephys, ...` here

__all__ = ["ErrorLog", "WorkerLog", "cube_worker", "standard_worker"]


def auto_check_sources():
    """A callable step that logs what goes wrong per key instead of raising, as the workflows'
    ``auto_generate_probe_insertions`` do."""
    for key in (lab.Source & "value < 0").keys():
        try:
            raise ValueError(f"source {key['source_id']} has a negative value")
        except Exception as error:
            logger.debug(f"Error checking {key} -> {lab.Source.full_table_name} - {error}")
            ErrorLog.log_exception(key, auto_check_sources, error)


# -------- Define worker(s) --------
worker_schema_name = db_prefix + "workerlog"
autoclear_error_patterns = ["%FileNotFound%"]

# standard worker for non-GPU jobs
standard_worker = DataJointWorker(
    "standard_worker",
    worker_schema_name,
    db_prefix=[db_prefix],
    run_duration=-1,
    sleep_duration=30,
    autoclear_error_patterns=autoclear_error_patterns,
)

standard_worker(auto_check_sources)
standard_worker(lab.Square, max_calls=10)

# a second worker, as the workflows' spike_sorting_worker
cube_worker = DataJointWorker(
    "cube_worker",
    worker_schema_name,
    db_prefix=db_prefix,
    run_duration=-1,
    sleep_duration=30,
    autoclear_error_patterns=autoclear_error_patterns,
)

cube_worker(lab.Cube, max_calls=10)


# -------- Run worker(s) --------
configured_workers = {"standard_worker": standard_worker, "cube_worker": cube_worker}


def run(**kwargs):
    worker = configured_workers[kwargs["worker_name"]]
    worker._run_duration = kwargs["duration"]
    worker._sleep_duration = kwargs["sleep"]

    try:
        worker.run()
    except Exception:
        _logger.exception("Worker '{}' encountered an exception:".format(kwargs["worker_name"]))


def cli():
    """Calls :func:`run` passing the CLI arguments extracted from `sys.argv`."""
    args = parse_args(sys.argv[1:])
    logging.basicConfig(level=args.loglevel or logging.WARNING)
    run(worker_name=args.worker_name, duration=args.duration, sleep=args.sleep)


if __name__ == "__main__":
    cli()
