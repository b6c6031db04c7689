"""`djsupervisor restart`: new worker code rolled under a running supervisor, one child at a time.

The worker module lives in the test's tmp_path (next to the config file, where targets are imported
from), as a lab's own module does; the test edits it as a deploy would. Its make() writes the module's
FACTOR and its pid into each row, so the rows say which code computed them and which child did.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import datajoint as dj
import pytest
from helpers import djsupervisor_command, wait_until, write_config

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

MODULE = '''
import os, time
import datajoint as dj
from djsupervisor import DataJointWorker
{head}
PREFIX = os.environ["DJS_TEST_PREFIX"]
FACTOR = {factor}
dj.config["safemode"] = False
schema = dj.Schema(PREFIX + "_deploy")


@schema
class Item(dj.Manual):
    definition = """
    item_id : int
    """


@schema
class Result(dj.Computed):
    definition = """
    -> Item
    ---
    factor : int
    pid : int
    """

    def make(self, key):
        time.sleep(0.3)
        self.insert1(dict(key, factor=FACTOR, pid=os.getpid()))


deploy = DataJointWorker("deploy", PREFIX + "_workers", sleep_duration=0.3, db_prefix=PREFIX)
{register}
'''


def write_module(path: Path, factor: int, head: str = "", register: str = "deploy(Result)") -> None:
    path.write_text(MODULE.format(factor=factor, head=head, register=register))


def restart(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*djsupervisor_command(), "restart", "--name", "deploy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def deployed(db, supervise, tmp_path):
    """A supervisor running two children of `deploy_code:deploy` (FACTOR 2), and its tables."""
    module = tmp_path / "deploy_code.py"
    write_module(module, 2)
    config = write_config(
        tmp_path / "deploy.toml",
        """
        [supervisor]
        name = "deploy"
        graceful_timeout = 30

        [[worker]]
        name = "deploy"
        target = "deploy_code:deploy"
        replicas = 2
        """,
    )
    sup = supervise(["-c", str(config)])
    sup.wait_children({"deploy": 2})
    tables = dj.VirtualModule("deploy", db.schema_name("deploy"), connection=db.connection)
    return sup, module, tables


def computed(tables, ids) -> dict[int, dict]:
    rows = (tables.Result & [{"item_id": i} for i in ids]).to_dicts()
    return {row["item_id"]: row for row in rows}


def work(tables, ids, timeout: float = 90) -> dict[int, dict]:
    """Insert Items `ids` and wait until each has its Result."""
    tables.Item.insert([{"item_id": i} for i in ids], skip_duplicates=True)
    wait_until(lambda: len(computed(tables, ids)) == len(ids), timeout, message=f"items {ids[0]}.. computed")
    return computed(tables, ids)


def reserved(tables) -> list:
    return (tables.Result.jobs & "status='reserved'").to_dicts()


def test_restart_rolls_new_code_without_losing_a_job(deployed):
    sup, module, tables = deployed
    before = work(tables, range(0, 6))
    assert {row["factor"] for row in before.values()} == {2}
    old = sup.pids("deploy")

    write_module(module, 30)  # the deploy: make() now writes 30
    tables.Item.insert([{"item_id": i} for i in range(6, 30)])  # jobs in flight during the roll
    answer = restart()
    assert answer.returncode == 0, answer.stdout + answer.stderr + sup.output[-3000:]
    assert answer.stdout.count("restarted: deploy[") == 2, answer.stdout
    assert "restart done in" in answer.stdout
    new = sup.pids("deploy")
    assert len(new) == 2 and not set(new.values()) & set(old.values())

    after = work(tables, range(30, 40))
    assert {row["factor"] for row in after.values()} == {30}
    assert {row["pid"] for row in after.values()} <= set(new.values())
    every = work(tables, range(0, 40))  # none lost: every key computed (once: Result's key is the item)
    assert len(every) == 40
    assert reserved(tables) == []
    assert not (tables.Result.jobs & "status='error'").to_dicts()

    # a crash replacement after the restart runs the new code, not the code the parent imported
    sup_child = new["deploy[0]"]
    os.kill(sup_child, signal.SIGKILL)
    replaced = wait_until(
        lambda: (pids := sup.pids("deploy")).get("deploy[0]") not in (None, sup_child) and pids, 30, message="replaced"
    )
    tables.Item.insert([{"item_id": i} for i in range(40, 50)])
    wait_until(
        lambda: replaced["deploy[0]"] in {row["pid"] for row in computed(tables, range(40, 50)).values()},
        60,
        message="the replacement to compute a job",
    )
    by_replacement = [row for row in computed(tables, range(40, 50)).values() if row["pid"] == replaced["deploy[0]"]]
    assert {row["factor"] for row in by_replacement} == {30}

    # --worker names one pool (a wrong name: one line, exit 2); SIGUSR2 restarts every pool, as systemd can send it
    wrong = restart("--worker", "nope")
    assert wrong.returncode == 2 and "no worker named 'nope' (workers: deploy)" in wrong.stderr, wrong.stderr
    before_signal = sup.pids("deploy")
    sup.signal(signal.SIGUSR2)
    wait_until(lambda: "restart 2 done" in sup.output, 90, message="the SIGUSR2 restart")
    assert not set(sup.pids("deploy").values()) & set(before_signal.values())


def test_a_broken_deploy_halts_the_restart_and_the_old_children_keep_working(deployed):
    sup, module, tables = deployed
    old = sup.pids("deploy")

    # the new code does not import: nothing moves, the line names the file and line
    write_module(module, 30, head='raise RuntimeError("NAS not mounted")')
    answer = restart()
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "NAS not mounted" in answer.stderr and "deploy_code.py:5" in answer.stderr, answer.stderr
    assert sup.pids("deploy") == old

    # the new code imports, but its first child dies in its first cycle: the roll halts at that slot
    write_module(module, 30, register="deploy(lambda: os._exit(3))\ndeploy(Result)")
    answer = restart()
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "before it completed a first cycle or job" in answer.stderr, answer.stderr
    assert "deploy[0]: the new child exited (exit status 3)" in answer.stderr, answer.stderr
    assert sup.pids("deploy") == old
    rows = work(tables, range(0, 6))  # the old children keep working, on the old code
    assert {row["factor"] for row in rows.values()} == {2}
    assert {row["pid"] for row in rows.values()} <= set(old.values())
    assert reserved(tables) == []
