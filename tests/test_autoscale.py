"""Autoscaling end to end: a real `djsupervisor start` grows a pool while its table has pending jobs (as the
fleet agent reads them) and shrinks it back once they are done; every key is computed exactly once."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli as cli
from helpers import wait_until, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

KEYS = 240  # at ~50 ms each: about 12 s for one child, enough for the pool to grow twice


def test_pool_grows_under_a_backlog_and_shrinks_back_when_idle(db, supervise, tmp_path):
    pipe = declare(db.schema_name("pipe"))
    pipe.seed(range(KEYS), delay=0.05)
    config = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        name = "scaling"
        fleet_interval = 0.5
        sample_interval = 0.5

        [[worker]]
        name = "standard"
        target = "pipelines.supervised:standard"
        replicas = 1
        max_replicas = 3
        scale_up_pending = 2
        scale_cooldown = 1
        scale_down_after = 1.5
    """,
    )
    sup = supervise(["-c", str(config)])
    most = [0]

    def children(n: int):
        def seen():
            count = len(sup.pids("standard"))
            most[0] = max(most[0], count)
            return count == n

        return seen

    wait_until(children(1), 30, message=f"the first child; output:\n{sup.output[-3000:]}")
    wait_until(children(3), 60, message=f"the pool grown to 3; output:\n{sup.output[-3000:]}")

    def status() -> dict:
        result = cli(db, tmp_path, "status", "--json", "-c", str(config))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    (pool,) = status()["pools"]
    assert pool["worker"] == "standard" and pool["autoscale"]["min"] == 1 and pool["autoscale"]["max"] == 3
    assert pool["replicas"] == 3 or len(pipe.Square()) == KEYS  # it may already have shrunk if the work is done

    refused = cli(db, tmp_path, "scale", "standard", "5", "-c", str(config))
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        "scale: pool standard autoscales up to max_replicas 3: scale sets its "
        "minimum, got 5 (raise max_replicas in the config and reload)"
    )

    wait_until(lambda: len(pipe.Square()) == KEYS, 90, message="every key computed")
    wait_until(children(1), 30, message=f"the pool shrunk back to 1; output:\n{sup.output[-3000:]}")
    assert most[0] == 3  # never above max_replicas

    (pool,) = status()["pools"]
    assert pool["replicas"] == 1 and pool["autoscale"]["pending"] == 0
    text = cli(db, tmp_path, "status", "-c", str(config)).stdout
    assert "autoscale standard: 1 of 1..3 children, 0 pending" in text

    output = sup.output
    assert "autoscale standard: grow from 1 to 2" in output and "autoscale standard: grow from 2 to 3" in output
    assert "autoscale standard: shrink from 3 to 2" in output and "autoscale standard: shrink from 2 to 1" in output
    # every key exactly once: one row each, no job in error (a second make() of a key would fail on insert)
    assert len(pipe.Square()) == KEYS
    assert len(pipe.Square.jobs.errors) == 0
    assert len({row["worker_pid"] for row in pipe.Square.to_dicts()}) >= 2  # the grown pool shared the work

    sup.signal(15)
    assert sup.wait_exit(30) == 0
