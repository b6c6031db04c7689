"""`djsupervisor errors`: what is failing, grouped by table and by message.

The error jobs of every table the workers populate are counted in SQL by exact message (one GROUP BY per
job table), then grouped here by the message with its numbers, paths, hex strings and quoted values folded
(`normalise`): 400 keys failing on "missing file /raw/s12/f0033.dat" and the like make one line with a
count. Each group has its first and last time seen and one example key (one statement per group); its
stack with ``--show-stack``.

djsupervisor's own history follows: the ErrorLog rows of the workers' schemas that no job table holds any
more (transient errors a worker cleared for retry, ``kind = cleared``) or never held (callables that
raised, ``kind = callable``), grouped the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from typing import Any

from djsupervisor.operate.pipeline import Pipeline, PipelineTable, Sql
from djsupervisor.worker.compat import decode_stack

#: Folded in this order: quoted values, paths, UUIDs and long hex strings, then numbers.
_FOLDS = (
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:[\w.~-]*[/\\])+[\w.~-]*"), "<path>"),
    (re.compile(r"\b[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\b"), "<id>"),
    # hex of 6 digits or more with a letter and a digit (a hash, an address), not "5e" of 1.5e-3
    (re.compile(r"\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<hex>"),
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"), "<n>"),
)
_MAX_MESSAGES = 10000  # distinct messages read per job table: a bound on memory, far above any real spread
_MAX_EXAMPLES = 100  # groups per table given an example key (one statement each): a bound on statements


def normalise(message: str) -> str:
    """`message` with what varies from key to key folded: ``missing file /raw/3.dat`` → ``missing file
    <path>``, ``calibration 7 out of range`` → ``calibration <n> out of range``; whitespace collapsed."""
    text = " ".join((message or "").split())
    for pattern, token in _FOLDS:
        text = pattern.sub(token, text)
    return text


@dataclasses.dataclass
class ErrorGroup:
    """Errors of one table (or ErrorLog process) with one normalised message."""

    table: str  # quoted full name, or the callable's name for history
    label: str
    message: str  # normalised
    count: int
    first_seen: datetime.datetime | None
    last_seen: datetime.datetime | None
    example_message: str
    kind: str = "job"  # job (in a job table now), cleared or callable (ErrorLog history)
    example_key: dict | None = None
    stack: str | None = None

    def add(self, count: int, first: Any, last: Any) -> None:
        self.count += count
        self.first_seen = min((t for t in (self.first_seen, first) if t is not None), default=None)
        self.last_seen = max((t for t in (self.last_seen, last) if t is not None), default=None)

    def as_json(self) -> dict:
        return {
            "table": self.table,
            "label": self.label,
            "kind": self.kind,
            "message": self.message,
            "count": self.count,
            "first_seen": _iso(self.first_seen),
            "last_seen": _iso(self.last_seen),
            "example_key": self.example_key,
            "example_message": self.example_message,
            **({"stack": self.stack} if self.stack is not None else {}),
        }


def _iso(value: Any) -> str | None:
    return value.isoformat(sep=" ", timespec="seconds") if isinstance(value, datetime.datetime) else None


def _group(rows: list[tuple], table: str, label: str, kind: str) -> list[ErrorGroup]:
    """Groups from (message, count, first, last) rows, most frequent first."""
    groups: dict[str, ErrorGroup] = {}
    for message, count, first, last in rows:
        folded = normalise(message)
        group = groups.get(folded)
        if group is None:
            groups[folded] = ErrorGroup(table, label, folded, int(count), first, last, message, kind)
        else:
            group.add(int(count), first, last)
    return sorted(groups.values(), key=lambda g: (-g.count, g.message))


def job_errors(sql: Sql, entry: PipelineTable, match: str | None, stacks: bool) -> list[ErrorGroup]:
    """The error jobs of one table, grouped; each group with one example key (and its stack)."""
    jobs = entry.job_table_sql(sql)
    if jobs is None or entry.job_table is None:
        return []
    message, completed, status = sql.q("error_message"), sql.q("completed_time"), sql.q("status")
    where = f"{status} = 'error'" + (f" AND {message} LIKE %s" if match is not None else "")
    args = (match,) if match is not None else ()
    rows = sql.rows(
        f"SELECT {message}, COUNT(*), MIN({completed}), MAX({completed}) FROM {jobs} WHERE {where} "
        f"GROUP BY {message} ORDER BY COUNT(*) DESC LIMIT {_MAX_MESSAGES}",
        args,
    )
    groups = _group(rows, entry.full_name, entry.label, "job")
    columns = entry.job_table.key_columns
    for group in groups[:_MAX_EXAMPLES]:
        picked = ", ".join(sql.q(c) for c in columns) + (f", {sql.q('error_stack')}" if stacks else "")
        found = sql.rows(
            f"SELECT {picked} FROM {jobs} WHERE {status} = 'error' AND {message} = %s ORDER BY {completed} LIMIT 1",
            (group.example_message,),
        )
        if found:
            group.example_key = {c: _plain(v) for c, v in zip(columns, found[0], strict=False)}
            if stacks:
                group.stack = decode_stack(found[0][len(columns)])
    return groups


def history(
    sql: Sql, pipeline: Pipeline, tables: list[PipelineTable] | None, match: str | None, stacks: bool
) -> list[ErrorGroup]:
    """ErrorLog rows of kind ``cleared`` and ``callable`` in the workers' schemas, grouped; with `tables`
    (``--table``), only those of these tables (callables have none)."""
    q = sql.q
    labels = {t.full_name: t.label for t in pipeline.tables}
    out: list[ErrorGroup] = []
    for schema in pipeline.worker_schemas:
        log = pipeline.worker_table(schema, "error_log")
        if log is None:
            continue
        where, args = [f"{q('kind')} IN ('cleared', 'callable')"], []
        if tables is not None:
            names = [t.full_name for t in tables]
            where.append(f"{q('process')} IN ({', '.join(['%s'] * len(names))})")
            args += names
        if match is not None:
            where.append(f"{q('error_message')} LIKE %s")
            args.append(match)
        rows = sql.rows(
            f"SELECT {q('kind')}, {q('process')}, {q('error_message')}, COUNT(*), MIN({q('error_time')}), "
            f"MAX({q('error_time')}) FROM {log} WHERE {' AND '.join(where)} "
            f"GROUP BY {q('kind')}, {q('process')}, {q('error_message')} LIMIT {_MAX_MESSAGES}",
            args,
        )
        by_source: dict[tuple[str, str], list[tuple]] = {}
        for kind, process, message, count, first, last in rows:
            by_source.setdefault((kind, process), []).append((message, count, first, last))
        for (kind, process), grouped in sorted(by_source.items()):
            for index, group in enumerate(_group(grouped, process, labels.get(process, process), kind)):
                out.append(group)
                if index >= _MAX_EXAMPLES:
                    continue
                picked = q("key") + (f", {q('error_stack')}" if stacks else "")
                found = sql.rows(
                    f"SELECT {picked} FROM {log} WHERE {q('kind')} = %s AND {q('process')} = %s "
                    f"AND {q('error_message')} = %s ORDER BY {q('error_time')} LIMIT 1",
                    (kind, process, group.example_message),
                )
                if found:
                    key = found[0][0]
                    group.example_key = json.loads(key) if isinstance(key, (str, bytes)) else key
                    if stacks:
                        group.stack = decode_stack(found[0][1])
    return out


def _plain(value: Any) -> Any:
    from djsupervisor.worker.attempts import plain_key

    return plain_key({"v": value})["v"]


def format_errors(current: list[ErrorGroup], past: list[ErrorGroup], *, stacks: bool = False) -> str:
    """The text of `errors`: a table of the groups, each followed by its example key (and stack)."""
    from djsupervisor.log import escape_controls
    from djsupervisor.serve.status_format import format_table

    lines: list[str] = []
    for title, groups in (("errors in the job tables", current), ("ErrorLog history (cleared, callables)", past)):
        total = sum(g.count for g in groups)
        lines.append(f"{title}: {total} in {len(groups)} group{'s' * (len(groups) != 1)}")
        if not groups:
            lines.append("")
            continue
        header = ("TABLE", "KIND", "COUNT", "FIRST SEEN", "LAST SEEN", "MESSAGE")
        rows = [
            (g.label, g.kind, str(g.count), _iso(g.first_seen) or "-", _iso(g.last_seen) or "-", g.message)
            for g in groups
        ]
        table = format_table(header, rows)  # aligned over every group, then each group's example below it
        lines.append(table[0])
        for group, line in zip(groups, table[1:], strict=True):
            lines.append(line)
            example = json.dumps(group.example_key, sort_keys=True, default=str)
            lines.append(escape_controls(f"    e.g. {example}: {group.example_message}"))
            if stacks and group.stack:
                lines.extend("    | " + escape_controls(line) for line in group.stack.rstrip().splitlines())
        lines.append("")
    return "\n".join(lines).rstrip()


def run(args: Any, pipeline: Pipeline) -> int:
    """`djsupervisor errors`."""
    tables = pipeline.select(args.table)
    current = [g for entry in tables for g in job_errors(pipeline.sql, entry, args.match, args.show_stack)]
    past = history(pipeline.sql, pipeline, tables if args.table else None, args.match, args.show_stack)
    if args.json:
        report = {"errors": [g.as_json() for g in current], "history": [g.as_json() for g in past]}
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_errors(current, past, stacks=args.show_stack))
    return 0
