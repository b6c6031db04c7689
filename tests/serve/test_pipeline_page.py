"""The pipeline on the status page, `/progress.json`, `/errors.json` and `djsupervisor status`: what the fleet
agent reads (the parent reads no table), from a pipeline in a known state under a real supervisor.

Before the start an in-process worker computed Square for 1 and 2 and failed 3-8 with three messages; the
supervisor's `standard` pool then computes 9 and 10; its `other` pool has no child, so Cube keeps its 4
keys remaining. Headless Chromium renders the page: a progress bar per table, the error groups and the
jobs-done chart of each pool. With DJS_SCREENSHOT=PATH the test also saves a screenshot of the page there
(README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import wait_until, write_config
from pipelines.lab import declare
from test_http_status import chromium_dom, cli, get

from djsupervisor import DataJointWorker

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

CONFIG = """
    [supervisor]
    name = "lab"
    control_socket = "{socket}"
    http = "127.0.0.1:0"
    fleet_interval = 0.5
    graceful_timeout = 5

    [[worker]]
    name = "standard"
    target = "pipelines.supervised:standard"
    replicas = 1

    [[worker]]
    name = "other"
    target = "pipelines.supervised:other"
    replicas = 0
"""


def test_progress_errors_and_chart_from_the_fleet_agent(db, supervise, tmp_path):
    lab = declare(db.schema_name("pipe"))
    lab.seed([1, 2], delay=0.5)
    for i in (3, 4, 5):
        lab.seed([i], fail=f"missing file /data/raw/session{i}/probe.dat")
    lab.seed([6, 7], fail="calibration out of range")
    lab.seed([8], fail="no probe for this session")
    worker = DataJointWorker("standard", db.schema_name("workers"), sleep_duration=1, db_prefix=db.prefix)
    worker(lab.Square)
    worker.run_once()
    config = write_config(tmp_path / "lab.toml", CONFIG.format(socket=tmp_path / "lab.sock"))
    sup = supervise(["-c", str(config)])
    sup.wait_children({"standard": 1})
    result = wait_until(
        lambda: (r := cli(db, tmp_path, "status", "--json", "-c", str(config))).returncode == 0 and r,
        20,
        message="status over the control socket",
    )
    address = json.loads(result.stdout)["http"]
    wait_until(lambda: json.loads(get(f"http://{address}/progress.json")[2])["age"] is not None, 30, message="read")
    lab.seed([9, 10], delay=0.5)

    def square_done() -> dict | None:
        report = json.loads(get(f"http://{address}/progress.json")[2])
        rows = {row["label"].split(".")[-1]: row for row in report["tables"]}
        return report if rows and rows["Square"]["done"] == 4 else None

    report = wait_until(square_done, 60, message="the agent's reading shows 9 and 10 done")
    square, cube = report["tables"]
    assert (square["total"], square["done"], square["remaining"], square["error"], square["ignore"]) == (10, 4, 0, 6, 0)
    assert square["workers"] == ["standard"] and cube["workers"] == ["other"]
    assert (cube["total"], cube["done"], cube["remaining"]) == (4, 0, 4)
    throughput = wait_until(
        lambda: (
            (t := json.loads(get(f"http://{address}/progress.json")[2])["throughput"])
            and sum(n for _, n in t.get("standard", [])) == 2
            and t
        ),
        30,
        message="2 jobs counted from the children's counters",
    )
    assert sum(n for _, n in throughput.get("other", [])) == 0

    errors = json.loads(get(f"http://{address}/errors.json")[2])["errors"]
    assert [(g["message"], g["count"]) for g in errors] == [
        ("ValueError: missing file <path>", 3),
        ("ValueError: calibration out of range", 2),
        ("ValueError: no probe for this session", 1),
    ]
    assert errors[0]["example_key"]["source_id"] in (3, 4, 5)

    text = cli(db, tmp_path, "status", "-c", str(config)).stdout.splitlines()
    pools = [line for line in text if line.startswith("pool ")]
    assert [re.sub(r"read \S+ ago", "read ? ago", line) for line in pools] == [
        "pool other: 4 remaining, 0 in error (1 table, read ? ago)",
        "pool standard: 0 remaining, 6 in error (1 table, read ? ago)",
    ]
    assert text.index(pools[-1]) < next(i for i, line in enumerate(text) if line.startswith("WORKER"))
    queues = json.loads(cli(db, tmp_path, "status", "--json", "-c", str(config)).stdout)["pool_progress"]
    assert [(q["worker"], q["tables"], q["remaining"], q["error"]) for q in queues] == [
        ("other", 1, 4, 0),
        ("standard", 1, 0, 6),
    ]

    dom = chromium_dom(f"http://{address}/", tmp_path)
    bars = re.findall(r'<progress max="(\d+)" value="(\d+)"></progress> ([\d.]+)%', dom)
    assert bars == [("10", "4", "40.0"), ("4", "0", "0.0")], dom[-3000:]
    assert len(re.findall(r'<td class="msg">ValueError: ', dom)) == 3
    assert re.search(r"<td>0 left</td></tr>.*<td>-</td></tr>", dom, re.S)  # Square: 6 errors are not "done"
    assert 'data-pool="standard" data-total="2"' in dom and 'data-pool="other" data-total="0"' in dom
    assert len(re.findall(r'<rect class="bar"', dom)) >= 1
    screenshot = os.environ.get("DJS_SCREENSHOT")
    if screenshot:
        subprocess.run(
            [
                shutil.which("chromium") or "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'shot'}",
                "--window-size=1280,1100",
                "--hide-scrollbars",
                f"--screenshot={screenshot}",
                f"http://{address}/",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    assert cli(db, tmp_path, "stop", "-c", str(config)).returncode == 0
    assert sup.wait_exit(30) == 0
