"""Autoscaling: the decision class without processes, exactly (time and readings passed in), the config keys,
how `scale`, TTIN/TTOU and reload treat an autoscaled pool (the parent's bookkeeping, no child forked), and end
to end: a real `djsupervisor start` grows a pool while its table has pending jobs (as the fleet agent reads them)
and shrinks it back once they are done; every key is computed exactly once."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from helpers import run_cli as cli
from helpers import wait_until, write_config
from pipelines.lab import declare

from djsupervisor.fleet.view import FleetView
from djsupervisor.supervisor.arbiter import Supervisor
from djsupervisor.supervisor.autoscale import Autoscaler, AutoscaleSettings, HostBudget, Observation
from djsupervisor.supervisor.config import ConfigError, load_config
from djsupervisor.supervisor.pool import Pool

pytestmark = pytest.mark.timeout(30)

STALE = 15.0  # 3 fleet intervals of 5 s


def scaler(max_replicas=3, up=2, down_after=60, cooldown=30, step=1, **budget) -> Autoscaler:
    return Autoscaler(AutoscaleSettings(max_replicas, up, down_after, cooldown, step), HostBudget(**budget))


def see(a: Autoscaler, now, reading, pending, desired=1, live=None, minimum=1, **host):
    """What `a` decides at `now` with a fleet reading taken at `reading`; returns (action, new size, kind)."""
    d = a.decide(
        Observation(
            now=now,
            reading_time=reading,
            pending=pending,
            desired=desired,
            minimum=minimum,
            live=desired if live is None else live,
            stale_after=STALE,
            **host,
        )
    )
    return d.action, d.replicas, d.kind


def test_grows_only_on_two_consecutive_readings_above_the_threshold():
    a = scaler()
    assert see(a, 0, 0, 3) == ("hold", 1, "hysteresis")  # 3 > 2 × 1 child, first reading
    assert see(a, 1, 0, 3) == ("hold", 1, "hysteresis")  # the same reading again does not count twice
    assert see(a, 5, 5, 2) == ("hold", 1, "steady")  # 2 is not above 2 × 1: the streak starts over
    assert see(a, 10, 10, 3) == ("hold", 1, "hysteresis")
    assert see(a, 15, 15, 3) == ("grow", 2, "load")
    assert see(a, 16, 15, 3, desired=2) == ("hold", 2, "steady")  # 3 is not above 2 × 2
    assert see(a, 20, 20, 5, desired=2) == ("hold", 2, "hysteresis")  # a growth starts the count over


def test_cooldown_between_two_changes():
    a = scaler(cooldown=30)
    see(a, 0, 0, 100)
    assert see(a, 5, 5, 100) == ("grow", 2, "load")
    assert see(a, 10, 10, 100, desired=2) == ("hold", 2, "hysteresis")
    assert see(a, 15, 15, 100, desired=2) == ("hold", 2, "cooldown")
    assert see(a, 34.9, 30, 100, desired=2) == ("hold", 2, "cooldown")
    assert see(a, 35, 30, 100, desired=2) == ("grow", 3, "load")
    assert see(a, 70, 70, 100, desired=3) == ("hold", 3, "at-max")


def test_step_and_bounds():
    a = scaler(max_replicas=4, step=3, cooldown=0)
    see(a, 0, 0, 100)
    assert see(a, 5, 5, 100) == ("grow", 4, "load")  # 1 + 3
    b = scaler(max_replicas=4, step=3, cooldown=0)
    see(b, 0, 0, 100, desired=2)
    assert see(b, 5, 5, 100, desired=2) == ("grow", 4, "load")  # capped at max_replicas
    assert see(scaler(), 0, 0, 0, desired=1, minimum=2) == ("grow", 2, "bounds")  # `scale` raised the floor
    assert see(scaler(max_replicas=3), 0, 0, 0, desired=5) == ("shrink", 3, "bounds")  # a reload lowered max


def test_no_growth_while_the_pool_is_still_starting_children():
    a = scaler(cooldown=0)
    see(a, 0, 0, 100, desired=2, live=1)
    assert see(a, 5, 5, 100, desired=2, live=1) == ("hold", 2, "starting")
    assert see(a, 6, 5, 100, desired=2, live=2) == ("grow", 3, "load")


def test_shrinks_by_one_after_scale_down_after_seconds_of_zero_pending_then_once_per_cooldown():
    a = scaler(down_after=60, cooldown=30)
    assert see(a, 100, 100, 0, desired=3) == ("hold", 3, "idle-wait")
    assert see(a, 130, 130, 4, desired=3) == ("hold", 3, "steady")  # work came back: idle starts over
    assert see(a, 140, 140, 0, desired=3) == ("hold", 3, "idle-wait")
    assert see(a, 199.9, 195, 0, desired=3) == ("hold", 3, "idle-wait")
    assert see(a, 200, 200, 0, desired=3) == ("shrink", 2, "idle")  # 60 s since the first zero reading
    assert see(a, 210, 210, 0, desired=2) == ("hold", 2, "cooldown")
    assert see(a, 230, 230, 0, desired=2) == ("shrink", 1, "idle")
    assert see(a, 300, 300, 0, desired=1) == ("hold", 1, "at-min")


def test_stale_or_missing_readings_hold_and_break_the_streaks():
    a = scaler(cooldown=0)
    assert see(a, 0, None, None) == ("hold", 1, "no-reading")
    assert see(a, 1, 1, None) == ("hold", 1, "no-reading")  # the agent has not read this pool's tables
    see(a, 10, 10, 100)
    assert see(a, 25.1, 10, 100) == ("hold", 1, "stale")  # 15.1 s old > 3 intervals
    assert see(a, 30, 30, 100) == ("hold", 1, "hysteresis")  # the streak started over
    assert see(a, 35, 35, 100) == ("grow", 2, "load")
    b = scaler(down_after=10, cooldown=0)
    see(b, 0, 0, 0, desired=2)
    assert see(b, 16, 0, 0, desired=2) == ("hold", 2, "stale")  # idle long enough, but the reading is stale
    assert see(b, 20, 20, 0, desired=2) == ("hold", 2, "idle-wait")  # idle time counts again from here
    assert see(b, 30, 30, 0, desired=2) == ("shrink", 1, "idle")


def test_a_drained_pool_holds_and_starts_over_afterwards():
    a = scaler(cooldown=0, down_after=5)
    see(a, 0, 0, 100)
    assert see(a, 5, 5, 100, drained="drain") == ("hold", 1, "drained")
    assert see(a, 10, 10, 100) == ("hold", 1, "hysteresis")  # the streak started over
    b = scaler(cooldown=0, down_after=5)
    see(b, 0, 0, 0, desired=2)
    assert see(b, 10, 10, 0, desired=2, drained="halt") == ("hold", 2, "drained")


def test_a_reading_that_missed_one_of_the_pools_tables_is_no_reading():
    view = FleetView()
    view.apply({"tables": {"w": ["a", "b"]}, "depths": {"a": {"pending": 3}, "b": {"pending": 4}}}, now=1.0)
    assert view.pending("w") == 7
    view.apply({"tables": {"w": ["a", "b"]}, "depths": {"a": {"pending": 3}}}, now=2.0)  # b could not be read
    assert view.pending("w") is None and view.age(now=3.0) == 1.0
    assert see(scaler(), 3, view.updated, view.pending("w")) == ("hold", 1, "no-reading")


def test_no_growth_over_the_host_cpu_budget():
    a = scaler(cooldown=0, max_cpu_percent=80)
    see(a, 0, 0, 100)
    assert see(a, 5, 5, 100, cpu_percent=80.0) == ("hold", 1, "cpu")
    assert see(a, 6, 5, 100, cpu_percent=None) == ("grow", 2, "load")  # not measured yet: no limit
    b = scaler(cooldown=0, max_cpu_percent=80)
    see(b, 0, 0, 100)
    assert see(b, 5, 5, 100, cpu_percent=79.9) == ("grow", 2, "load")
    c = scaler(cooldown=0, max_cpu_percent=80)  # shrinking is never held by the budget
    see(c, 0, 0, 0, desired=2)
    assert see(c, 100, 100, 0, desired=2, cpu_percent=100.0) == ("shrink", 1, "idle")


def test_no_growth_over_the_host_memory_budget_counting_the_new_childrens_median_rss():
    a = scaler(cooldown=0, step=2, min_available_memory_mb=1000)
    see(a, 0, 0, 100)
    assert see(a, 5, 5, 100, available_mb=999.0) == ("hold", 1, "memory")
    assert see(a, 6, 5, 100, available_mb=1500.0, child_rss_mb=300.0) == ("hold", 1, "memory")  # 1500 - 2 × 300
    assert see(a, 7, 5, 100, available_mb=1600.0, child_rss_mb=300.0) == ("grow", 3, "load")
    b = scaler(cooldown=0, min_available_memory_mb=1000)
    see(b, 0, 0, 100)
    assert see(b, 5, 5, 100, available_mb=1000.0, child_rss_mb=None) == ("grow", 2, "load")  # no sample yet


def test_a_pool_with_minimum_zero_grows_from_zero_and_shrinks_to_zero():
    a = scaler(down_after=10, cooldown=0)
    see(a, 0, 0, 1, desired=0, minimum=0)
    assert see(a, 5, 5, 1, desired=0, minimum=0) == ("grow", 1, "load")  # 1 pending > 2 × 0 children
    see(a, 10, 10, 0, desired=1, minimum=0)
    assert see(a, 20, 20, 0, desired=1, minimum=0) == ("shrink", 0, "idle")


# ----- configuration

W = '[[worker]]\nname = "w"\ntarget = "pipelines.offline:worker"\n'

AUTOSCALE_ERRORS = [
    (W + "replicas = 2\nmax_replicas = 1\n", r"worker\[0\] \(w\)\.max_replicas", r"must be >= replicas \(2\), got 1"),
    (W + "max_replicas = 0\n", r"worker\[0\] \(w\)\.max_replicas", "must be >= 1, got 0"),
    (W + 'max_replicas = "3"\n', r"worker\[0\] \(w\)\.max_replicas", "must be an integer, got str '3'"),
    (W + "max_replicas = 2.5\n", r"worker\[0\] \(w\)\.max_replicas", "must be an integer, got float 2.5"),
    (W + "max_replicas = 3\nscale_up_pending = -1\n", r"worker\[0\] \(w\)\.scale_up_pending", "must be >= 0"),
    (W + "max_replicas = 3\nscale_down_after = -5\n", r"worker\[0\] \(w\)\.scale_down_after", "must be >= 0"),
    (W + "max_replicas = 3\nscale_cooldown = true\n", r"worker\[0\] \(w\)\.scale_cooldown", "must be a number, got bo"),
    (W + "max_replicas = 3\nscale_step = 0\n", r"worker\[0\] \(w\)\.scale_step", "must be >= 1, got 0"),
    (W + "scale_cooldown = 5\n", r"worker\[0\] \(w\)\.scale_cooldown", "only applies to an autoscaled pool"),
    ("[supervisor]\nmax_cpu_percent = 150\n" + W, "supervisor.max_cpu_percent", "must be <= 100"),
    ("[supervisor]\nmax_cpu_percent = 0\n" + W, "supervisor.max_cpu_percent", "must be > 0"),
    ("[supervisor]\nmin_available_memory_mb = -1\n" + W, "supervisor.min_available_memory_mb", "must be >= 0"),
    ("[supervisor]\nfleet_interval = 0\n" + W, "supervisor.fleet_interval", "must be > 0"),
]


@pytest.mark.parametrize("content, key, problem", AUTOSCALE_ERRORS)
def test_bad_autoscale_settings_are_one_line_config_errors(tmp_path, content, key, problem):
    path = tmp_path / "lab.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_targets=False)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(path))}: {key}: .*{problem}", message), message


def test_autoscale_settings_and_defaults(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(
        "[supervisor]\nmax_cpu_percent = 85\nmin_available_memory_mb = 512\n"
        + W
        + "replicas = 2\nmax_replicas = 6\nscale_up_pending = 4\nscale_step = 2\n"
        + '[[worker]]\nname = "fixed"\ntarget = "pipelines.offline:worker"\n'
    )
    config = load_config(path, check_targets=False)
    auto, fixed = config.workers
    assert auto.autoscale == AutoscaleSettings(
        max_replicas=6, scale_up_pending=4, scale_down_after=60.0, scale_cooldown=30.0, scale_step=2
    )
    assert fixed.autoscale is None and fixed.max_replicas is None
    assert config.budget == HostBudget(max_cpu_percent=85, min_available_memory_mb=512)
    retuned = dataclasses.replace(auto, max_replicas=9, scale_up_pending=1, scale_down_after=5, scale_cooldown=1)
    assert retuned.definition == auto.definition  # retuning autoscaling does not roll the pool's children


# ----- scale, TTIN/TTOU and reload on an autoscaled pool (the parent's bookkeeping, nothing forked)


def supervisor_with(tmp_path, text: str) -> Supervisor:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    sup = Supervisor(load_config(path, check_targets=False), path)
    for worker in sup.config.workers:
        sup.pools[worker.name] = Pool.create(worker, sup.config.budget, sup.config.name)
    return sup


def sizes(sup: Supervisor) -> dict:
    """(desired size, minimum, max_replicas) per pool; minimum and max None for a fixed-size pool."""
    return {
        name: (p.replicas, p.minimum, p.autoscaler.settings.max_replicas) if p.autoscaler else (p.replicas, None, None)
        for name, p in sup.pools.items()
    }


def test_scale_sets_the_minimum_of_an_autoscaled_pool_and_refuses_more_than_max_replicas(tmp_path):
    sup = supervisor_with(tmp_path, W + "replicas = 1\nmax_replicas = 4\n")
    assert sup.handle_control({"cmd": "scale", "worker": "w", "replicas": 3}) == {
        "ok": True,
        "worker": "w",
        "replicas": 3,
        "min": 3,
        "max": 4,
        "before": 1,  # the minimum it had: `djsupervisor scale` prints it
    }
    sup.pools["w"].replicas = 4  # the autoscaler grew it
    assert sup.handle_control({"cmd": "scale", "worker": "w", "replicas": 2})["replicas"] == 4  # no shrink now
    assert sizes(sup) == {"w": (4, 2, 4)}
    answer = sup.handle_control({"cmd": "scale", "worker": "w", "replicas": 5})
    assert answer == {
        "ok": False,
        "error": "pool w autoscales up to max_replicas 4: scale sets its minimum, got 5 "
        "(raise max_replicas in the config and reload)",
    }
    assert sizes(sup) == {"w": (4, 2, 4)}
    pool = sup.pools["w"].status(sup.fleet.pending("w"))
    assert pool == {
        "worker": "w",
        "replicas": 4,
        "autoscale": {"min": 2, "max": 4, "pending": None, "decision": None, "reason": None},
    }


def test_ttin_and_ttou_move_the_minimum_of_an_autoscaled_pool_within_its_bounds(tmp_path):
    sup = supervisor_with(
        tmp_path,
        W + "replicas = 1\nmax_replicas = 2\n" + '[[worker]]\nname = "fixed"\ntarget = "pipelines.offline:worker"\n',
    )
    sup.handle_ttin()
    assert sizes(sup) == {"w": (2, 2, 2), "fixed": (2, None, None)}
    sup.handle_ttin()  # at max_replicas: the autoscaled pool stays, the fixed one grows
    assert sizes(sup) == {"w": (2, 2, 2), "fixed": (3, None, None)}
    sup.handle_ttou()
    assert sizes(sup) == {"w": (2, 1, 2), "fixed": (2, None, None)}  # the autoscaler shrinks it when idle


def test_reload_keeps_the_runtime_minimum_unless_replicas_changed_and_clamps_to_new_bounds(tmp_path):
    sup = supervisor_with(tmp_path, W + "replicas = 1\nmax_replicas = 4\n")
    sup.scale("w", 2)
    sup.pools["w"].replicas = 4
    autoscaler = sup.pools["w"].autoscaler

    def reload(text: str) -> dict:
        sup.config_path.write_text(text)
        sup.request_reload()
        return sizes(sup)

    budget = "[supervisor]\nmax_cpu_percent = 70\n"
    assert reload(budget + W + "replicas = 1\nmax_replicas = 4\nscale_cooldown = 5\n") == {"w": (4, 2, 4)}
    assert sup.pools["w"].autoscaler is autoscaler and autoscaler.settings.scale_cooldown == 5  # state kept
    assert autoscaler.budget == HostBudget(max_cpu_percent=70)  # the new file's budget
    assert reload(W + "replicas = 1\nmax_replicas = 3\n") == {"w": (3, 2, 3)}  # clamped to the new max
    assert reload(W + "replicas = 3\nmax_replicas = 3\n") == {"w": (3, 3, 3)}  # a changed replicas is the minimum
    assert reload(W + "replicas = 1\n") == {"w": (1, None, None)}  # autoscaling removed: the config's size
    assert reload(W + "replicas = 1\nmax_replicas = 2\n") == {"w": (1, 1, 2)}  # and back


def test_status_text_has_a_line_per_autoscaled_pool():
    from djsupervisor.serve.status_format import format_status

    text = format_status(
        {
            "supervisor": "lab",
            "pid": 1,
            "state": "running",
            "slots": [],
            "pools": [
                {"worker": "fixed", "replicas": 2, "autoscale": None},
                {
                    "worker": "w",
                    "replicas": 2,
                    "autoscale": {
                        "min": 1,
                        "max": 4,
                        "pending": 40,
                        "decision": "grow",
                        "reason": "40 pending for 1 child > 2 per child",
                    },
                },
                {
                    "worker": "v",
                    "replicas": 1,
                    "autoscale": {"min": 1, "max": 2, "pending": None, "decision": None, "reason": None},
                },
            ],
        }
    )
    assert text.splitlines()[1:] == [
        "autoscale w: 2 of 1..4 children, 40 pending; grow: 40 pending for 1 child > 2 per child",
        "autoscale v: 1 of 1..2 children, - pending",
    ]


# ----- end to end: a real `djsupervisor start`


KEYS = 240  # at ~50 ms each: about 12 s for one child, enough for the pool to grow twice


@pytest.mark.process
@pytest.mark.timeout(150)
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
