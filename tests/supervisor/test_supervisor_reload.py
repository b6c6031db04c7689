"""Changing the pools of a running `djsupervisor start`: HUP reloads, TTIN/TTOU resize."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from helpers import djsupervisor_command, process_gone, wait_until, write_config
from pipelines.lab import declare

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]


def pool(name: str, target: str, replicas: int, extra: str = "") -> str:
    return f'\n[[worker]]\nname = "{name}"\ntarget = "pipelines.supervised:{target}"\nreplicas = {replicas}\n{extra}'


HEAD = '[supervisor]\nname = "lab"\ngraceful_timeout = 20\n'


def test_hup_adds_removes_resizes_and_rolls_without_touching_unchanged_pools(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    config = write_config(tmp_path / "lab.toml", HEAD + pool("standard", "standard", 1) + pool("other", "other", 1))
    sup = supervise(["-c", str(config)])
    before = sup.wait_children({"standard": 1, "other": 1})

    # resize standard, remove other, add third
    write_config(config, HEAD + pool("standard", "standard", 2) + pool("third", "other", 1))
    sup.signal(signal.SIGHUP)
    after = sup.wait_children({"standard": 2, "third": 1}, timeout=30)
    assert after["standard[0]"] == before["standard[0]"]  # resized, not restarted
    assert process_gone(before["other[0]"])

    # a changed definition rolls its children one at a time; the unchanged pool keeps running
    write_config(config, HEAD + pool("standard", "standard", 2, "sleep_duration = 2") + pool("third", "other", 1))
    sup.signal(signal.SIGHUP)
    fewest = 2
    deadline = time.monotonic() + 60
    while True:
        pids = sup.pids("standard")
        fewest = min(fewest, len(pids))
        if len(pids) == 2 and not set(pids.values()) & {after["standard[0]"], after["standard[1]"]}:
            break
        assert time.monotonic() < deadline, f"standard not rolled: {pids}\n{sup.output[-3000:]}"
        time.sleep(0.02)
    assert fewest >= 1  # never both at once
    assert sup.pids("third") == {"third[0]": after["third[0]"]}
    assert sup.output.count("): worker definition changed") == 2  # one "stopping ..." line each

    # a broken file is refused and everything keeps running
    config.write_text("[supervisor\n")
    running = sup.pids()
    sup.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in sup.output, 20, message="the reload to be refused")
    assert sup.pids() == running
    # ...and `djsupervisor reload` says so: one line, exit status 2
    answer = subprocess.run(
        [*djsupervisor_command(), "reload", "--name", "lab"],
        capture_output=True,
        text=True,
        timeout=30,
        env=db.env,
    )
    assert answer.returncode == 2, answer
    assert answer.stderr.startswith("djsupervisor: error: reload: reload failed, the running configuration stays: ")
    assert answer.stderr.count("\n") == 1 and str(config) in answer.stderr
    assert sup.pids() == running
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0


def test_ttin_and_ttou_grow_and_shrink_every_pool(db, supervise, tmp_path):
    declare(db.schema_name("pipe"))
    config = write_config(tmp_path / "lab.toml", HEAD + pool("standard", "standard", 1) + pool("other", "other", 1))
    sup = supervise(["-c", str(config)])
    first = sup.wait_children({"standard": 1, "other": 1})

    sup.signal(signal.SIGTTIN)
    grown = sup.wait_children({"standard": 2, "other": 2}, timeout=30)
    assert {k: grown[k] for k in first} == first

    sup.signal(signal.SIGTTOU)
    shrunk = sup.wait_children({"standard": 1, "other": 1}, timeout=30)
    assert shrunk == first  # the newest slots go
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
