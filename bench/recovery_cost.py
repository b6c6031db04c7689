"""Cost of one recovery pass (stale/orphan/error scan) as a job table grows: 1k, 10k, 100k pending jobs.

Usage: .venv/bin/python bench/recovery_cost.py   (both backends; about 2 minutes, mostly DataJoint refresh)
"""
import statistics
import sys
import time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import conftest, pipeline
from djsupervisor.jobs import JobRecovery
from loguru import logger
logger.remove()
for backend in ["mysql", "postgresql"]:
    conn = conftest.configure_datajoint(backend)
    conftest.drop_schemas(conn, "djsrc")
    p = pipeline.make_pipeline("djsrc_pipe")
    for n in [1000, 10000, 100000]:
        p.Source.insert([dict(source_id=i, value=float(i)) for i in range(len(p.Source()) + 1, n + 1)])
        t = time.perf_counter(); p.Square.jobs.refresh(); tr = time.perf_counter() - t
        rec = JobRecovery(conn, db_prefix=["djsrc"])
        rec.run()
        times = []
        for _ in range(5):
            t = time.perf_counter(); rec.run(); times.append(time.perf_counter() - t)
        print(backend, n, "pending:", p.Square.jobs.progress()["pending"], f"recovery median {statistics.median(times)*1000:.1f} ms; refresh {tr:.1f}s")
    conftest.drop_schemas(conn, "djsrc")
