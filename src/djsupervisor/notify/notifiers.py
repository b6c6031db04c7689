"""The notifier interface (datajoint-utilities' own) and the two webhook notifiers built in.

A notifier is anything with a ``notify(title, message, **kwargs)`` method, as datajoint-utilities'
``dj_notification.notifier.Notifier`` defines it: lab code written for that package (a Mailgun or an SNS
notifier, say) works unchanged. The keyword arguments are upstream's too: for a job, ``schema_name``,
``table_name``, ``key``, ``status`` (``START``, ``SUCCESS``, ``ERROR``), ``error_message`` and the key's
own attributes (see `djsupervisor.worker.notifications`).

The built-in notifiers POST JSON with `urllib` (standard library, so nothing to install), with a timeout
on connecting and on each read, and raise on failure: the `Dispatcher` that calls them, in a background
thread, logs the failure and goes on. Each notifier carries its own rate limit (`window`, `gather`), which
the dispatcher applies; a notifier of the lab's own without those attributes gets the defaults.
"""

from __future__ import annotations

import abc
import json
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from djsupervisor.worker.settings import check_url

#: Seconds a built-in notifier's HTTP request may take to connect, and then for each read.
DEFAULT_TIMEOUT = 5.0
#: At most one message per notifier per this many seconds; what comes in between is summarised.
DEFAULT_WINDOW = 60.0
#: Seconds a notifier waits after the first notification of a quiet spell, so that a burst is one message.
DEFAULT_GATHER = 2.0

_MAX_TEXT = 3000  # characters of a message a Slack section shows before "see more"; longer stacks are cut


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} seconds, got {value!r}")
    return float(value)


def check_notifiers(notifiers: Any) -> tuple[Any, ...]:
    """`notifiers` as a tuple, each checked to have a callable ``notify`` (ValueError, one line, naming the
    first that has not), as datajoint-utilities checks them."""
    if notifiers is None:
        return ()
    if not isinstance(notifiers, (list, tuple)):
        raise ValueError(f"notifiers must be a list of notifiers, got {type(notifiers).__name__}")
    for index, notifier in enumerate(notifiers):
        if not callable(getattr(notifier, "notify", None)):
            raise ValueError(f"notifiers[{index}] ({type(notifier).__name__}) has no callable notify method")
    return tuple(notifiers)


class Notifier(abc.ABC):
    """datajoint-utilities' notifier interface: subclass it and implement `notify`.

    `window` and `gather` are the rate limit the dispatcher applies to this notifier (see
    `djsupervisor.notify.dispatch`); `timeout` bounds how long the dispatcher waits for it at shutdown.
    """

    window: float = DEFAULT_WINDOW
    gather: float = DEFAULT_GATHER
    timeout: float = DEFAULT_TIMEOUT

    @abc.abstractmethod
    def notify(self, title: str, message: str, **kwargs: Any) -> Any:
        """Send one notification."""


class WebhookNotifier(Notifier):
    """POSTs each notification as JSON to `webhook_url`; the body is `payload`'s.

    Parameters
    ----------
    webhook_url : str
        The webhook, http:// or https:// (upstream's SlackWebhookNotifier's argument name). It never appears in
        logs or errors (Slack's holds its token).
    timeout : float
        Seconds to connect, and then for each read of the answer (urllib's timeout).
    window : float
        At most one message per this many seconds; notifications in between are summarised in one.
    gather : float
        Seconds to wait after the first notification of a quiet spell, collecting a burst into one message.
    headers : mapping, optional
        Extra HTTP headers (an ``Authorization`` token, say).
    """

    def __init__(
        self,
        webhook_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        window: float = DEFAULT_WINDOW,
        gather: float = DEFAULT_GATHER,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = check_url(webhook_url, "webhook url must be")
        self.timeout = _seconds("timeout", timeout, positive=True)
        self.window = _seconds("window", window, positive=False)
        self.gather = _seconds("gather", gather, positive=False)
        self.headers = dict(headers or {})

    @abc.abstractmethod
    def payload(self, title: str, message: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON body for one notification."""

    def notify(self, title: str, message: str, **kwargs: Any) -> int:
        """POST the notification; returns the HTTP status. Raises on a connection failure, a timeout or an
        answer other than 2xx (urllib's errors: their text never holds the URL)."""
        body = json.dumps(self.payload(title, message, **kwargs), default=str).encode("utf-8")
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "djsupervisor", **self.headers},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # the URL was checked: http(s) only
            response.read(65536)  # a small answer ("ok"): read so that the connection closes cleanly
            return int(response.status)

    def __repr__(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return f"{type(self).__name__}({parts.scheme}://{parts.hostname}/…)"  # not the path: it is the secret


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


class SlackWebhookNotifier(WebhookNotifier):
    """A Slack incoming webhook (or anything that takes Slack's ``{"text": ...}``: Mattermost, Rocket.Chat).

    The text is the title in bold and the message as a code block, as datajoint-utilities' Slack notifier
    writes it; ``blocks=[...]`` (Slack's Block Kit) is sent as given instead, as there.
    """

    def payload(self, title: str, message: str, **kwargs: Any) -> dict[str, Any]:
        blocks = kwargs.get("blocks")
        if blocks is not None:
            return {"blocks": blocks}
        return {"text": f"*{title}*\n```{_cut(message)}```"}


class JsonWebhookNotifier(WebhookNotifier):
    """Any webhook that takes a JSON object: ``{"title", "message"}`` and every keyword argument (for a job:
    ``status``, ``schema_name``, ``table_name``, ``key``, ``error_message``, ...; for a summary, ``count``
    and ``counts``). Values JSON has no type for are written as text."""

    def payload(self, title: str, message: str, **kwargs: Any) -> dict[str, Any]:
        return {**kwargs, "title": title, "message": message}


def webhooks(
    slack: str | None, json_url: str | None, *, timeout: float = DEFAULT_TIMEOUT, window: float = DEFAULT_WINDOW
) -> list[WebhookNotifier]:
    """The built-in notifiers a config names (``[supervisor] notify_slack_webhook``, ``notify_json_webhook``)."""
    found: list[WebhookNotifier] = []
    if slack:
        found.append(SlackWebhookNotifier(slack, timeout=timeout, window=window, gather=min(window, DEFAULT_GATHER)))
    if json_url:
        found.append(JsonWebhookNotifier(json_url, timeout=timeout, window=window, gather=min(window, DEFAULT_GATHER)))
    return found
