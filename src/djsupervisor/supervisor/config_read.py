"""Reading one TOML table with its settings' declarations, and collecting every problem of a config file.

`djsupervisor check` reports every problem of a file in one pass, so a reader never stops at the first: each
problem is a `ConfigError` (one line: file, key, problem) added to a `Problems` list, and the key is left
out of what was read. Commands that cannot go on with a wrong file raise the first problem
(`Problems.raise_first`); `check` prints them all. An unknown key's problem suggests the closest known key
(``did you mean 'replicas'?``, difflib).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from djsupervisor.supervisor.gpus import check_gpus
from djsupervisor.worker.settings import Setting, check_url, type_name


class ConfigError(Exception):
    """A configuration problem; ``str(error)`` is one line: ``FILE: KEY: PROBLEM``.

    `problems` holds every problem found in the file when this is the first of several (else just itself)."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        text = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__(" ".join(text.split()))  # one line, whatever the problem's text holds
        self.problems: tuple[ConfigError, ...] = (self,)


class Problems(list):
    """The problems found so far in one config file (a list of ConfigError)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def add(self, key: str, problem: str) -> None:
        self.append(ConfigError(self.source, key, problem))

    def raise_first(self) -> None:
        """Raise the first problem (carrying all of them in `problems`), if there is one."""
        if self:
            first = self[0]
            first.problems = tuple(self)
            raise first


def unknown_key(key: str, known: Iterable[str]) -> str:
    """``unknown key (did you mean 'replicas'? known: ...)``: the closest known key suggested, if any is close."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(known)})"


def split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as (host, port); ValueError saying what is wrong.

    Port 0 means any free port."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"must be 'host:port', got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(ch.isspace() or ch in "/[]" for ch in host) or (":" in host and not text.startswith("[")):
        raise ValueError(f"must be 'host:port' (an IPv6 host in brackets), got {text!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port must be a number, got {text!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port} in {text!r}")
    return host, port


def split_target(text: str) -> tuple[str, str]:
    """``"module:attribute"`` as (module, attribute); ValueError saying what is wrong."""
    if text.count(":") != 1 or not all(text.split(":")):
        raise ValueError(f"must be 'module:attribute', got {text!r}")
    module, _, attribute = text.partition(":")
    return module, attribute


#: The checks of a string setting's `form`, beyond its type: each raises ValueError with the problem.
FORMS: dict[str, Callable[[str], object]] = {
    "host:port": split_host_port,
    "module:attribute": split_target,
    "url": check_url,  # its problem never shows the URL: a webhook's path is its secret
    "gpus": check_gpus,
}
#: What a key that `requires` another makes of a pool, for the problem of one given without it.
REQUIRED_FOR = {"max_replicas": "an autoscaled pool", "gpus": "a GPU pool"}


def as_table(problems: Problems, key: str, value: Any) -> Mapping[str, Any]:
    """`value` if it is a TOML table; else the problem is added and an empty table stands in."""
    if not isinstance(value, dict):
        problems.add(key, f"must be a table, got {type_name(value)}")
        return {}
    return value


def read_table(
    problems: Problems, prefix: str, table: Mapping[str, Any], settings: tuple[Setting, ...]
) -> dict[str, Any]:
    """``{key: value}`` of every declared key given and valid; every problem is added to `problems`.

    Unknown keys first (with the closest known key), then each declared key in declaration order. Only the
    keys given are returned: the config dataclasses hold the defaults."""
    known = [setting.name for setting in settings]
    for key in table:
        if key not in known:
            problems.add(f"{prefix}.{key}", unknown_key(key, known))
    values = {}
    for setting in settings:
        if setting.name not in table:
            if setting.required:
                problems.add(f"{prefix}.{setting.name}", "missing (required)")
            continue
        if setting.requires and setting.requires not in table:
            what = REQUIRED_FOR.get(setting.requires, f"a pool with {setting.requires}")
            problems.add(f"{prefix}.{setting.name}", f"only applies to {what}: set {setting.requires} too")
            continue
        try:
            value = setting.check(table[setting.name])
            if setting.form:
                FORMS[setting.form](value)
        except ValueError as error:
            problems.add(f"{prefix}.{setting.name}", str(error))
            continue
        values[setting.name] = value
    return values
