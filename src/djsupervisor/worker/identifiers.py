"""SQL identifiers: quoted here, never by DataJoint's adapter, and checked against DataJoint's naming.

Job recovery reads schema, table and column names from the server's catalog and writes them into SQL.
DataJoint 2.3's ``adapter.quote_identifier`` wraps a name in backticks or double quotes without doubling a
quote inside it, so a table named ``~~a`WHERE f()>0#`` (MySQL) or ``~~a";SELECT f();--`` (PostgreSQL),
created by any account whose tables the worker can see, turned a recovery statement into the attacker's
SQL, run with the worker's privileges on every cycle. Two defences, both here:

* `quote` doubles the quote character inside a name (the SQL standard's and MySQL's escaping), so any name
  is one identifier;
* names read from the catalog must look like DataJoint's own (`is_job_table_name`, `is_column_name`);
  anything else is skipped by the caller with a warning, never put into SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

#: DataJoint's attribute names (declare.py: lowercase, starting with a letter).
_COLUMN = re.compile(r"[a-z][a-z0-9_]*", re.ASCII)
#: A DataJoint 2.x job table: ``~~`` and the target's name without its tier underscores.
_JOB_TABLE = re.compile(r"~~[a-z][a-z0-9_]*", re.ASCII)
#: A DataJoint table name of any tier (manual, lookup ``#``, imported ``_``, computed ``__``, parts ``__x__y``,
#: hidden ``~``).
_TABLE = re.compile(r"[~#_]{0,2}[a-z][a-z0-9_]*", re.ASCII)
#: Schema names: DataJoint itself does not restrict them further than the server; letters, digits, ``_``,
#: ``-`` and ``$`` cover every name seen in lab pipelines and exclude every quote, space and comment marker.
_SCHEMA = re.compile(r"[A-Za-z0-9_$-]+", re.ASCII)
#: A full table name as DataJoint writes it (either backend's quote character around both parts) or as the
#: supervisor's reports abbreviate it (no quotes).
_FULL_NAME = re.compile(r"""(?P<q>[`"]?)(?P<schema>[^`".]+)(?P=q)\.(?P=q)(?P<table>[^`".]+)(?P=q)""")


class UnsafeIdentifier(ValueError):
    """A name that is not what DataJoint would have made: never put into SQL."""


def quote_char(backend: str) -> str:
    """The identifier quote of a backend: a backtick on MySQL/MariaDB, a double quote on PostgreSQL."""
    return '"' if backend == "postgresql" else "`"


def quote(backend: str, name: str) -> str:
    """`name` as one quoted identifier for `backend`, quote characters inside it doubled."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafeIdentifier(f"not a usable SQL identifier: {name!r}")
    q = quote_char(backend)
    return q + name.replace(q, q + q) + q


def full_name(backend: str, schema: str, table: str) -> str:
    """``schema.table`` with both parts quoted."""
    return f"{quote(backend, schema)}.{quote(backend, table)}"


def key_terms(quoted: Callable[[str], str], columns: Sequence[str], count: int) -> str:
    """``((a=%s AND b=%s) OR ...)``: a WHERE term matching any of `count` keys of `columns`, whose values follow
    as arguments in that order; `quoted` quotes a column name for the connection's backend."""
    one = "(" + " AND ".join(f"{quoted(c)}=%s" for c in columns) + ")"
    return "(" + " OR ".join([one] * count) + ")"


def is_column_name(name: str) -> bool:
    """Whether `name` is a DataJoint attribute name."""
    return _COLUMN.fullmatch(name) is not None


def is_job_table_name(name: str) -> bool:
    """Whether `name` is the name of a DataJoint 2.x job table (``~~x``)."""
    return _JOB_TABLE.fullmatch(name) is not None


def is_table_name(name: str) -> bool:
    """Whether `name` is a DataJoint table name of any tier."""
    return _TABLE.fullmatch(name) is not None


def is_schema_name(name: str) -> bool:
    """Whether `name` is a plain schema name (no quote, space, dot or comment marker)."""
    return _SCHEMA.fullmatch(name) is not None


def split_full_name(full: str) -> tuple[str, str]:
    """(schema, table) of a full table name as DataJoint writes it (`` `s`.`t` `` or ``"s"."t"``) or unquoted
    (``s.t``, as the children's reports give it).

    Raises `UnsafeIdentifier` unless both parts are plain DataJoint names.
    """
    match = _FULL_NAME.fullmatch(full.strip())
    if match is None:
        raise UnsafeIdentifier(f"not a quoted full table name: {full!r}")
    schema, table = match["schema"], match["table"]
    if not is_schema_name(schema) or not is_table_name(table):
        raise UnsafeIdentifier(f"not a DataJoint table name: {full!r}")
    return schema, table
