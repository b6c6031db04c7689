"""The database password from a systemd credential, instead of `DJ_PASS` in an environment file.

An environment variable is inherited by every process the service starts (a `make()`'s shell command
included) and shows in ``/proc/PID/environ``; an EnvironmentFile is one more file holding the password. The
units load it with ``LoadCredential=dj_pass:/etc/djsupervisor/NAME.dj_pass``: systemd copies the file into
a directory only the service's user can read and names that directory in ``$CREDENTIALS_DIRECTORY``. Every
`djsupervisor` command reads ``$CREDENTIALS_DIRECTORY/dj_pass`` (`CREDENTIAL`) first, when it exists, and
gives it to DataJoint as its password, masked in every log line; `DJ_PASS` is then removed from the
environment. A config file's ``[database] password`` still wins over it, as it wins over `DJ_PASS`.
Trailing newlines (``echo secret > file``) are not part of the password.

The parent imports no database code at module level: DataJoint is imported here only when the credential
is there, and the command line imports DataJoint then anyway (its targets do).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The credential's name: ``LoadCredential=dj_pass:...`` in the units, ``$CREDENTIALS_DIRECTORY/dj_pass`` here.
CREDENTIAL = "dj_pass"


class CredentialError(Exception):
    """The credential is there but cannot be read; str() is one line."""


def credential_path() -> Path | None:
    """``$CREDENTIALS_DIRECTORY/dj_pass``, or None when systemd gave no credentials directory."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / CREDENTIAL if directory else None


def credential_password() -> str | None:
    """The password in the credential file (trailing newlines stripped); None when there is none."""
    path = credential_path()
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise CredentialError(f"credential {path}: cannot read: {reason or error}") from None


def apply_credential() -> bool:
    """If the credential exists: DataJoint's password is set from it, masked in logs, and `DJ_PASS` removed
    from the environment (it is stale then, and would be inherited). Whether it existed."""
    password = credential_password()
    if password is None:
        return False
    from djsupervisor.log import add_secret

    add_secret(password)
    from djsupervisor.preflight import import_datajoint  # a refused DJ_* setting: one line

    import_datajoint().config["database.password"] = password
    os.environ.pop("DJ_PASS", None)
    return True
