"""Where worker targets are imported from: never the working directory first.

Targets (``module:attribute``) used to be found by putting the working directory at ``sys.path[0]``; a
package planted in a world-writable directory then ran as root when root ran ``djsupervisor check -c ...``
there (issue 18). Now the config file's directory and ``[supervisor] pythonpath`` are *appended*, after
site-packages, so that nothing there can shadow the standard library or an installed package; without a
config file (``djsupervisor start MODULE...``) the working directory is appended the same way. As root, a
directory on that list that group or others can write to is refused: whoever can write there runs as root.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path


class ImportPathError(Exception):
    """A directory that may not be imported from; str() is one line naming it."""


def config_directories(config_file: Path, pythonpath: Iterable[str]) -> list[Path]:
    """The config file's directory, then each `pythonpath` entry (a relative one taken from the config file's
    directory), all absolute."""
    base = config_file.resolve().parent
    return [base, *((base / entry).resolve() for entry in pythonpath)]


def check_directory(directory: Path) -> None:
    """ImportPathError if we run as root and `directory` is writable by group or others."""
    if os.geteuid() != 0:
        return
    try:
        mode = directory.stat().st_mode
    except OSError:
        return  # not there: nothing can be imported from it
    if stat.S_IMODE(mode) & 0o022:
        raise ImportPathError(
            f"{directory}: writable by group or others (mode {stat.S_IMODE(mode):04o});"
            " refusing to import worker code from it as root"
        )


def append_directories(directories: Iterable[Path]) -> None:
    """Check every directory (`check_directory`), then append those not yet on ``sys.path``."""
    directories = list(directories)
    for directory in directories:
        check_directory(directory)
    for directory in directories:
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
