"""The fleet agent's notifications: the supervisor's events, sent to the notifiers of the pool they are about.

The parent decides what is worth telling (a slot gone FATAL, a job timed out, a child recycled for memory,
a drain; see `djsupervisor.supervisor.notices`) but does no network I/O: a parent stuck on a webhook could
not supervise. So its events ride on the agent's command, and the agent, a child that may block, sends them
here. An event of pool P goes to P's worker's own notifiers (``DataJointWorker(notifiers=[...])``) and to
the config's webhooks (``[supervisor] notify_slack_webhook``, ``notify_json_webhook``), through one
`Dispatcher`, so that each notifier has one rate limit whatever the number of pools.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Mapping
from typing import Any

from djsupervisor.notify.dispatch import Dispatcher, Notification
from djsupervisor.notify.notifiers import webhooks
from djsupervisor.protocol import SupervisorEvent


def event_notification(event: SupervisorEvent, *, supervisor: str, host: str, to: tuple[Any, ...]) -> Notification:
    """The notification of one supervisor event: title ``djsupervisor NAME - POOL - KIND``, the event's line
    as the message, and the event's fields (``supervisor``, ``host``, ``pool``, ``slot``, ``kind``,
    ``status``, ``time``) as keyword arguments."""
    status = event["kind"].upper()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    return Notification(
        title=f"djsupervisor {supervisor} - {event['pool']} - {status}",
        message=f"{when} on {host}: {event['message']}",
        kwargs=dict(
            supervisor=supervisor,
            host=host,
            pool=event["pool"],
            slot=event["slot"],
            kind=event["kind"],
            status=status,
            time=event["time"],
        ),
        subject=event["pool"],
        status=status,
        to=to,
    )


class AgentNotifications:
    """Sends the supervisor's events of `supervisor` on `host` to `workers`' notifiers (pool -> worker) and
    to the `webhooks` of the config (`SupervisorConfig.webhooks`)."""

    def __init__(self, *, supervisor: str, host: str, workers: Mapping[str, Any], webhooks_config: Mapping[str, Any]):
        self.supervisor = supervisor
        self.host = host or platform.node()
        self.webhooks = tuple(webhooks(**webhooks_config)) if webhooks_config else ()
        self.by_pool = {pool: tuple(getattr(worker, "notifiers", ())) for pool, worker in workers.items()}
        every = [*self.webhooks, *(n for notifiers in self.by_pool.values() for n in notifiers)]
        self.dispatcher = Dispatcher(every, name="fleet-agent")

    def send(self, events: Iterable[SupervisorEvent]) -> None:
        """Queue each event for its pool's notifiers and the config's webhooks (never blocks)."""
        for event in events:
            to = (*self.webhooks, *self.by_pool.get(event["pool"], ()))
            if to:
                self.dispatcher.submit(event_notification(event, supervisor=self.supervisor, host=self.host, to=to))

    def close(self) -> None:
        """Send what is pending (within the notifiers' timeouts) before the agent exits."""
        self.dispatcher.close()
