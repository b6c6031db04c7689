"""Notifications: upstream's notifier interface on a worker, the built-in webhooks, the rate limit, and a webhook
that is dead or hangs never holding up a job.

Every webhook is a real HTTP server on 127.0.0.1 in a thread of the test (`webhook.Webhook`); the worker tests
run the test pipeline on both backends. What a notifier receives is checked against what datajoint-utilities'
PopulateHandler passed (title ``DataJoint populate - schema.Table - STATUS``, message ``Error making {key} ->
table - error``, keyword arguments schema_name, table_name, key, status, error_message and the key's own).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from helpers import wait_until
from loguru import logger
from pipelines.lab import declare
from webhook import Webhook, free_port_url

from djsupervisor import DataJointWorker
from djsupervisor.notify import Dispatcher, JsonWebhookNotifier, Notification, SlackWebhookNotifier

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """A notifier written the way a lab writes one for datajoint-utilities: a class with ``notify``. Without
    `window` and `gather` it would get the default rate limit (one summary of what came within 2 s)."""

    window = gather = 0.0

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def notify(self, title, message, **kwargs):
        self.calls.append(dict(kwargs, title=title, message=message))


@pytest.fixture
def hook():
    webhook = Webhook()
    yield webhook
    webhook.close()


@pytest.fixture
def warnings_logged():
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


def one_cycle_worker(db, notifiers, **step_kwargs) -> tuple[DataJointWorker, Any]:
    """A worker of Square with `notifiers` that stops after its first cycle, and the pipeline."""
    lab = declare(db.schema_name("pipe"))
    worker = DataJointWorker("notified", db.schema_name("workers"), run_duration=0.001, notifiers=notifiers)
    worker(lab.Square, **step_kwargs)
    return worker, lab


def test_failed_jobs_reach_a_json_webhook_as_upstream_passes_them(db, hook):
    notifier = JsonWebhookNotifier(hook.url, window=0, gather=0)
    worker, lab = one_cycle_worker(db, [notifier], notify_on=["ERROR"])  # any case, as upstream
    lab.seed([1, 2], fail="bad source")
    lab.seed([3])
    worker.run()
    bodies = sorted(hook.wait_for(2), key=lambda body: body["key"]["source_id"])
    assert len(hook.bodies) == 2  # the success of key 3 was not asked for
    table = lab.Square.full_table_name
    schema = lab.schema.database
    assert bodies[0] == {
        "title": f"DataJoint populate - {schema}.Square - ERROR",
        "message": f"Error making {{'source_id': 1}} -> {table} - ValueError: bad source",
        "schema_name": schema,
        "table_name": "Square",
        "key": {"source_id": 1},
        "status": "ERROR",
        "error_message": "ValueError: bad source",
        "source_id": 1,  # upstream spreads the key's attributes too
        "worker_name": "notified",
        "host": bodies[0]["host"],
    }
    assert bodies[1]["key"] == {"source_id": 2}


def test_a_lab_notifier_gets_start_success_and_error_for_tables_and_callables(db):
    recorder = Recorder()
    worker, lab = one_cycle_worker(db, [recorder], notify_on=["start", "success", "error"])

    def fails():
        raise RuntimeError("no luck")

    worker(fails, notify_on="error")
    fails_name = f"{__name__}.{fails.__qualname__}"
    worker(lambda: 1)  # not watched
    lab.seed([1])
    lab.seed([2], fail="broken")
    worker.run()
    seen = sorted((call["status"], call["table_name"], str(call["key"])) for call in recorder.calls)
    assert seen == [
        ("ERROR", "Square", "{'source_id': 2}"),
        ("ERROR", fails_name, "{}"),
        ("START", "Square", "{'source_id': 1}"),
        ("START", "Square", "{'source_id': 2}"),
        ("SUCCESS", "Square", "{'source_id': 1}"),
    ]
    error = next(call for call in recorder.calls if call["status"] == "ERROR" and call["schema_name"] == "")
    assert error["error_message"] == "RuntimeError: no luck" and error["message"].endswith(" - RuntimeError: no luck")


def test_500_failed_jobs_are_one_message_with_the_count(db, hook):
    notifier = JsonWebhookNotifier(hook.url, window=600, gather=600)  # nothing leaves before the worker stops
    worker, lab = one_cycle_worker(db, [notifier], notify_on=["error"])
    lab.seed(range(500), fail="bad source")
    worker.run()  # stopping flushes what is pending: one summary
    [body] = hook.wait_for(1)
    subject = f"{lab.schema.database}.Square ERROR"
    assert body["count"] == 500 and body["counts"] == {subject: 500}
    assert body["title"].startswith(f"DataJoint populate - {lab.schema.database}.Square - ERROR (500 ")
    assert body["message"].startswith("500 notifications in ") and f"  {subject}: 500" in body["message"]
    assert body["status"] == "ERROR" and body["key"]["source_id"] in range(500)  # the first one's arguments
    assert len(hook.bodies) == 1  # run() returned once the sending thread had ended: nothing more can come


def test_a_hanging_webhook_never_holds_up_a_job(db, warnings_logged):
    hanging = Webhook("hang")
    try:
        notifier = SlackWebhookNotifier(hanging.url, timeout=2, window=0, gather=0)
        worker, lab = one_cycle_worker(db, [notifier], notify_on=["start", "success", "error"])
        lab.seed(range(20))
        started = time.monotonic()
        worker.run()  # 40 notifications: sent one by one, each would wait its 2 s timeout
        elapsed = time.monotonic() - started
        assert hanging.hits >= 1
        starts = sorted(lab.Square.to_arrays("started"))
        assert len(starts) == 20
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert max(gaps) < 1.0, gaps  # no job waited for the webhook
        assert elapsed < 20, elapsed  # in-line sending: 40 × 2 s; here: the jobs, then at most the timeouts at stop
    finally:
        hanging.close()
    assert any("notifier SlackWebhookNotifier(http://127.0.0.1/…) failed" in line for line in warnings_logged)


def test_a_dead_webhook_is_logged_once_a_minute_and_never_raised(db, warnings_logged):
    notifier = JsonWebhookNotifier(free_port_url(), timeout=1, window=0, gather=0)
    worker, lab = one_cycle_worker(db, [notifier], notify_on=["start", "success"])
    lab.seed(range(10))
    worker.run()
    assert len(lab.Square()) == 10
    failures = [line for line in warnings_logged if "failed: URLError" in line]
    assert len(failures) == 1, warnings_logged
    assert "secret" not in failures[0] and "/hook" not in failures[0]  # the URL's path (a token) is never logged


# ----- the dispatcher and the notifiers, without a worker


def notification(i: int, status: str = "ERROR", subject: str = "lab.Square") -> Notification:
    return Notification(f"t{i}", f"m{i}", {"key": {"id": i}, "status": status}, subject, status)


def test_a_burst_is_one_message_and_the_rest_of_the_window_one_summary(hook):
    dispatcher = Dispatcher([JsonWebhookNotifier(hook.url, window=1.5, gather=0.3)])
    for i in range(500):
        dispatcher.submit(notification(i))
    [burst] = hook.wait_for(1)
    assert burst["count"] == 500 and burst["counts"] == {"lab.Square ERROR": 500} and burst["key"] == {"id": 0}
    dispatcher.submit(notification(500, "SUCCESS"))  # within the window: waits for its end
    dispatcher.submit(notification(501, "ERROR", "lab.Cube"))
    later = hook.wait_for(2)[1]
    assert hook.times[1] - hook.times[0] >= 1.5 - 0.05  # one message per window
    assert later["count"] == 2 and later["counts"] == {"lab.Square SUCCESS": 1, "lab.Cube ERROR": 1}
    assert later["title"].startswith("2 notifications ") and later["title"].endswith(", first: t500")
    dispatcher.submit(notification(502))
    assert dispatcher.close(5)
    assert hook.wait_for(3)[2]["title"] == "t502"  # alone: sent as it is; close sends at once


def test_a_full_queue_drops_and_counts(warnings_logged):
    hanging = Webhook("hang")
    try:
        dispatcher = Dispatcher([JsonWebhookNotifier(hanging.url, timeout=5, window=0, gather=0)], queue_size=5)
        dispatcher.submit(notification(0))
        wait_until(lambda: hanging.hits == 1, 10, message="the first request")  # the thread now waits on it
        started = time.monotonic()
        for i in range(1, 21):
            dispatcher.submit(notification(i))
        assert time.monotonic() - started < 0.5  # submit never waits
        assert dispatcher.dropped == 15
        assert sum("queue full" in line for line in warnings_logged) == 1
        hanging.released.set()
        assert dispatcher.close(15)
    finally:
        hanging.close()


def test_slack_payload_is_upstreams_text_or_blocks(hook):
    notifier = SlackWebhookNotifier(hook.url)
    assert notifier.notify("DataJoint populate - lab.Square - ERROR", "Error making ...") == 200
    notifier.notify("ignored", "ignored", blocks=[{"type": "divider"}])
    assert hook.wait_for(2) == [
        {"text": "*DataJoint populate - lab.Square - ERROR*\n```Error making ...```"},
        {"blocks": [{"type": "divider"}]},
    ]
    assert repr(notifier) == "SlackWebhookNotifier(http://127.0.0.1/…)"


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda: JsonWebhookNotifier("ftp://example.org/x"), "webhook url must be an http:// or https:// URL"),
        (lambda: JsonWebhookNotifier("https:///nohost"), "webhook url must be an http:// or https:// URL"),
        (lambda: SlackWebhookNotifier("https://h/x", timeout=0), "timeout must be > 0 seconds, got 0"),
        (lambda: DataJointWorker("w", "s", notifiers=[Recorder(), object()]), "notifiers[1] (object) has no"),
        (lambda: DataJointWorker("w", "s", notifiers=Recorder()), "notifiers must be a list of notifiers"),
        (lambda: DataJointWorker("w", "s")(print, notify_on=["eror"]), "notify_on: unknown status 'eror'"),
    ],
)
def test_bad_notifier_settings_are_one_line(make, problem):
    with pytest.raises(ValueError) as caught:
        make()
    assert problem in str(caught.value) and "\n" not in str(caught.value)
