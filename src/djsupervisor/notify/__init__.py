"""Notifications: upstream's notifier interface, two built-in webhooks, and the dispatcher that sends for them.

datajoint-utilities' workers take ``notifiers=[...]``, objects with a ``notify(title, message, **kwargs)``
method (its ``dj_notification.notifier.Notifier``), and each table step's ``notify_on=["start", "success",
"error"]``. Lab modules written for it keep working: `Notifier` here is the same interface, and any object
with a callable ``notify`` will do. Two notifiers labs ask for are built in, on the standard library alone
(no ``slack_sdk``, no ``requests``): `SlackWebhookNotifier` and `JsonWebhookNotifier`.

Why a dispatcher between the worker and its notifiers: a notifier does network I/O, and the worker must
never wait on it. `Dispatcher` takes notifications on a bounded queue (dropping, and counting, what does
not fit), sends them from one background thread, rate limits each notifier (a burst of 500 errors is one
message with a count) and logs failures at most once a minute, never raising them into the loop.

Who imports this: a worker process (in-process or a supervisor's child) and the fleet agent, which sends
the supervisor's own events. The supervisor's parent does no network I/O and does not import it.
"""

from __future__ import annotations

from djsupervisor.notify.dispatch import Dispatcher, Notification
from djsupervisor.notify.notifiers import JsonWebhookNotifier, Notifier, SlackWebhookNotifier, WebhookNotifier

__all__ = ["Dispatcher", "JsonWebhookNotifier", "Notification", "Notifier", "SlackWebhookNotifier", "WebhookNotifier"]
