"""ResourceSampler: the process tree it measures is the one psutil sees, and a gone process gives None."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
from helpers import wait_until

from djsupervisor.supervisor.monitor import ResourceSampler

pytestmark = pytest.mark.timeout(30)


def _spawning(code: str) -> str:
    """Python code that holds 20 MB, starts `code` in a new interpreter and sleeps."""
    return (
        f"import subprocess, sys, time; ballast = b'x' * (20 * 2**20); "
        f"subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(60)"
    )


def test_sampler_measures_the_whole_tree_and_forgets_the_gone():
    leaf = "import time; ballast = b'x' * (20 * 2**20); time.sleep(60)"
    root = subprocess.Popen([sys.executable, "-c", _spawning(_spawning(leaf))])
    tree = psutil.Process(root.pid)
    try:
        wait_until(lambda: len(tree.children(recursive=True)) == 2, 10, message="root, child and grandchild")
        sampler = ResourceSampler()
        assert {p.pid for p in sampler._descendants(tree)} == {p.pid for p in tree.children(recursive=True)}
        rss, cpu = sampler.sample(root.pid)
        assert rss > 3 * 20 and cpu >= 0
    finally:
        for member in tree.children(recursive=True):
            member.kill()
        root.kill()
        root.wait()
    assert sampler.sample(root.pid) is None
