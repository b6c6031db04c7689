"""sd_notify for a `Type=notify` service, standard library only.

Without NOTIFY_SOCKET (not under systemd) every method does nothing. gunicorn's systemd.py is the model.
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    """Sends READY, STATUS, WATCHDOG, RELOADING and STOPPING to systemd's notification socket."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self._socket: socket.socket | None = None
        self._status = ""  # the last STATUS= sent: the same line is not sent again

    def _send(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), self.address)
            return True
        except OSError:
            return False  # systemd went away or the socket is full: nothing to do but go on

    def ready(self) -> bool:
        """The service is up (children started)."""
        return self._send(f"READY=1\nMAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`; a line equal to the last one sent is not sent again."""
        text = text.replace("\n", " ")
        if text == self._status:
            return True
        sent = self._send("STATUS=" + text)
        self._status = text if sent else ""
        return sent

    def watchdog(self) -> bool:
        """Keep-alive for WatchdogSec=."""
        return self._send("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload started (READY=1 ends it). MONOTONIC_USEC is required by systemd >= 253's notify-reload."""
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        """A stop started."""
        return self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of WATCHDOG_USEC), or None when no watchdog is set for us."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            interval = int(usec) / 1e6 / 2
        except ValueError:
            return None
        return interval if interval > 0 else None
