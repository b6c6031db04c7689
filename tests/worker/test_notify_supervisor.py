"""The supervisor's events reach the notifiers through the fleet agent: the parent decides (a slot gone FATAL,
a child killed or recycled, a drain), the agent sends (the parent does no network I/O).

Three levels: a pool's notices without processes; a real forked agent (no pools, no database) sending what
the link's commands carry to a loopback webhook; and the real `djsupervisor start` whose crasher pool goes
FATAL, on both backends, with the webhook named in its config file.
"""

from __future__ import annotations

import ast
import os
import selectors
import subprocess
import sys
import time

import pytest
from helpers import wait_until, write_config
from webhook import Webhook

from djsupervisor.fleet.agent import AgentSpec
from djsupervisor.fleet.link import FleetAgentLink
from djsupervisor.protocol import SupervisorEvent
from djsupervisor.supervisor.autoscale import HostBudget
from djsupervisor.supervisor.config import ConfigError, SupervisorConfig, WorkerConfig, load_config
from djsupervisor.supervisor.pool import Pool, Spawn
from djsupervisor.supervisor.states import SlotState

pytestmark = pytest.mark.timeout(120)

RULES = SupervisorConfig("lab", (), fatal_after=2)


@pytest.fixture
def hook():
    webhook = Webhook()
    yield webhook
    webhook.close()


def started_pool(worker: WorkerConfig) -> Pool:
    """A pool whose children were all forked (pids made up), none of them got going yet."""
    pool = Pool.create(worker, HostBudget(), "lab")
    for index, action in enumerate(pool.reconcile(0.0, None)):
        assert isinstance(action, Spawn)
        action.slot.spawned(1000 + index, -1, 0.0)
    return pool


def test_a_pool_tells_once_of_a_fatal_slot_a_killed_or_recycled_child_and_a_drain():
    pool = started_pool(WorkerConfig("w", "m:w", replicas=2, job_timeout=10, max_memory_mb=100))
    crashing = pool.slots[0]
    while crashing.state is not SlotState.FATAL:
        crashing.exited(3, RULES, 1.0, stopping=False)
        if crashing.state is SlotState.BACKOFF:
            crashing.spawned(2000, -1, 1.0)
    pool.reconcile(2.0, None)
    pool.reconcile(3.0, None)  # still FATAL: not told again
    [fatal] = pool.notices.take()
    assert fatal["kind"] == "fatal" and fatal["pool"] == "w" and fatal["slot"] == 0
    assert fatal["message"] == (
        "w[0] is FATAL: 2 children in a row exited (exit status 3) before completing a cycle; "
        "not restarted until a reload"
    )
    working = pool.slots[1]
    working.reported([{"cycles_done": 1, "table": "lab.__t", "key": {"id": 1}, "job_elapsed": 11.0}], 4.0)
    pool.judge_children(4.0, heartbeat_timeout=30, hang_timeout=600, stopping=False)
    [timeout] = pool.notices.take()
    assert timeout["kind"] == "job_timeout" and timeout["slot"] == 1
    assert timeout["message"].startswith("w[1] (pid 1001): lab.__t {'id': 1} ran 11 s > job_timeout 10 s; killed")
    working.exited(-9, RULES, 5.0, stopping=False)
    working.spawned(3000, -1, 5.0)
    working.reported([{"cycles_done": 1}], 6.0)
    working.rss_mb = 150.0
    pool.judge_children(6.0, heartbeat_timeout=30, hang_timeout=600, stopping=False)
    [memory] = pool.notices.take()
    assert memory["kind"] == "memory" and "RSS 150 MB > max_memory_mb 100; recycled after its job" in memory["message"]
    pool.reconcile(7.0, "drain")
    pool.reconcile(8.0, "drain")
    assert [(e["kind"], e["slot"]) for e in pool.notices.take()] == [("drain", None)]


def test_the_agent_sends_the_events_the_link_carries_without_a_database(hook):
    selector = selectors.DefaultSelector()
    event = SupervisorEvent(kind="fatal", pool="crasher", slot=0, message="crasher[0] is FATAL: ...", time=time.time())
    pending = [event]

    def fork(child):
        pid = os.fork()
        if pid == 0:
            child([])
        return pid

    link = FleetAgentLink(
        spec=lambda: AgentSpec(
            supervisor="lab",
            host="node-a",
            fleet_interval=1.0,
            parent_pid=os.getpid(),
            worker_configs=[],
            webhooks=dict(slack=None, json_url=hook.url, timeout=2.0, window=0.0),
        ),
        children=lambda: [],
        fork=fork,
        selector=selector,
        on_report=lambda report: None,
        events=lambda: [pending.pop() for _ in list(pending)],
    )
    try:
        link.start()  # the first command carries the event
        assert link.events == []  # written whole: forgotten on this side
        [body] = hook.wait_for(1)
        assert body["title"] == "djsupervisor lab - crasher - FATAL"
        assert body["message"].endswith(" on node-a: crasher[0] is FATAL: ...")
        assert {k: body[k] for k in ("supervisor", "host", "pool", "slot", "kind", "status")} == {
            "supervisor": "lab",
            "host": "node-a",
            "pool": "crasher",
            "slot": 0,
            "kind": "fatal",
            "status": "FATAL",
        }
    finally:
        link.stop(fast=True)
        selector.close()


@pytest.mark.process
def test_a_slot_going_fatal_reaches_the_webhook_through_the_agent(db, supervise, tmp_path, hook):
    config = write_config(
        tmp_path / "lab.toml",
        f"""
        [supervisor]
        fatal_after = 2
        backoff_initial = 0.05
        backoff_max = 0.1
        fleet_interval = 0.5
        notify_json_webhook = "{hook.url}"
        notify_window = 0

        [[worker]]
        name = "crasher"
        target = "pipelines.supervised:crasher"
        """,
    )
    sup = supervise(["-c", str(config)])
    wait_until(lambda: hook.bodies, 60, message=f"a webhook call; output:\n{sup.output[-3000:]}")
    [body] = hook.bodies
    assert body["title"] == "djsupervisor lab - crasher - FATAL"
    assert body["kind"] == "fatal" and body["pool"] == "crasher" and body["slot"] == 0
    assert "crasher[0] is FATAL: 2 children in a row exited (exit status 3)" in body["message"]
    assert hook.url not in sup.output and "secret-token" not in sup.output  # the webhook is never logged


def test_the_parent_loads_no_notifier_code():
    """The parent collects events but sends nothing: starting it imports neither the notify package nor the
    agent's side of it (tests/test_layout.py's rule, for the notifiers)."""
    modules = ["djsupervisor.cli", "djsupervisor.supervisor.arbiter", "djsupervisor.serve.http"]
    code = f"import sys; import {', '.join(modules)}; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    loaded = ast.literal_eval(out.stdout)
    assert [name for name in loaded if name.startswith(("djsupervisor.notify", "djsupervisor.fleet.notify"))] == []
    assert "urllib.request" not in loaded


def test_a_webhook_that_is_not_a_url_is_one_line_that_never_shows_it(tmp_path):
    path = write_config(
        tmp_path / "lab.toml",
        """
        [supervisor]
        notify_slack_webhook = "hooks.slack.com/services/T0/B0/SECRET"

        [[worker]]
        name = "w"
        target = "pipelines.offline:worker"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_targets=False)
    assert str(caught.value) == (
        f"{path}: supervisor.notify_slack_webhook: must be an http:// or https:// URL with a host"
    )
