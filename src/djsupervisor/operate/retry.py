"""`djsupervisor retry`: put error jobs back to pending (or mark them ignored) after their cause is fixed.

The selection is the error jobs of one table (``--table``), those whose message matches an SQL LIKE pattern
(``--match``, as in `autoclear_error_patterns`; both together narrow each other), or every error job of
the workers' tables (``--all``, alone). Only rows whose status is ``error`` are ever touched, by statements
guarded by that status: a job reserved or running, pending or done, is left as it is, even one whose
state changed between the count and the update.

Jobs are changed in batches of `BATCH` keys, each one SELECT of keys and one UPDATE guarded by status and
pattern, so a selection of 100k errors never holds a long lock nor builds one huge statement. A re-pended
job's JobAttempt rows (`djsupervisor.worker.attempts`) are deleted in every worker schema of the table's
workers, so that it gets `max_attempts` fresh tries, including jobs given up on ("gave up after ...").

An empty selection, an unknown or ambiguous ``--table``, or no selection at all is refused with one line.
"""

from __future__ import annotations

import functools
from typing import Any

from djsupervisor.operate import OperateError
from djsupervisor.operate.pipeline import Pipeline, PipelineTable, Sql
from djsupervisor.worker import identifiers
from djsupervisor.worker.attempts import AttemptBook

BATCH = 200  # keys per UPDATE: bounded statements and locks, as job recovery's _CLEAR_BATCH


def _where(sql: Sql, match: str | None) -> tuple[str, tuple]:
    where = f"{sql.q('status')} = 'error'"
    if match is None:
        return where, ()
    return where + f" AND {sql.q('error_message')} LIKE %s", (match,)


def count_selected(sql: Sql, entry: PipelineTable, match: str | None) -> int:
    """Error jobs of `entry` the selection covers."""
    jobs = entry.job_table_sql(sql)
    if jobs is None:
        return 0
    where, args = _where(sql, match)
    return int(sql.rows(f"SELECT COUNT(*) FROM {jobs} WHERE {where}", args)[0][0])


def _books(pipeline: Pipeline, entry: PipelineTable) -> list[AttemptBook]:
    """The JobAttempt tables that may count attempts at the jobs of `entry`."""
    books = []
    for schema in entry.worker_schemas:
        name = pipeline.worker_table(schema, "job_attempt")
        if name is not None:
            books.append(AttemptBook(pipeline.sql.connection, functools.partial(str, name)))
    return books


def change(pipeline: Pipeline, entry: PipelineTable, match: str | None, *, ignore: bool, expected: int) -> int:
    """Re-pend (or ignore) the selected error jobs of `entry` in batches; returns how many changed."""
    sql = pipeline.sql
    jobs = entry.job_table_sql(sql)
    if jobs is None or entry.job_table is None:
        return 0
    from djsupervisor.worker.settle import JobQueue

    columns = entry.job_table.key_columns
    queue = JobQueue(sql.connection, jobs, columns, entry.full_name)
    assignments = f"{sql.q('status')} = 'ignore'" if ignore else queue.pending_assignments(0)
    where, args = _where(sql, match)
    picked = ", ".join(sql.q(c) for c in columns)
    books = [] if ignore else _books(pipeline, entry)
    changed = 0
    # Each batch changes what it selected (those rows leave the selection); the bound stops the loop even if
    # other processes keep turning jobs into errors meanwhile.
    for _ in range(expected // BATCH + 2):
        keys = sql.rows(f"SELECT {picked} FROM {jobs} WHERE {where} LIMIT {BATCH}", args)
        if not keys:
            break
        values = [value for key in keys for value in key]
        changed += sql.execute(
            f"UPDATE {jobs} SET {assignments} WHERE {where} AND {identifiers.key_terms(sql.q, columns, len(keys))}",
            (*args, *values),
        )
        for book in books:
            book.forget(entry.full_name, [dict(zip(columns, key, strict=True)) for key in keys])
            sql.statements += 1 + (len(keys) - 1) // BATCH
    return changed


def _describe(args: Any) -> str:
    parts = []
    if args.table:
        parts.append(f"table {args.table}")
    if args.match is not None:
        parts.append(f"message LIKE {args.match!r}")
    return " and ".join(parts) or "every table"


def run(args: Any, pipeline: Pipeline) -> int:
    """`djsupervisor retry`."""
    if args.all and (args.table or args.match is not None):
        raise OperateError("retry: --all selects every error job; give it alone, or --table/--match without it")
    if not (args.all or args.table or args.match is not None):
        raise OperateError("retry: say which error jobs: --table T, --match PATTERN, or --all")
    tables = pipeline.select(args.table)
    counts = [(entry, count_selected(pipeline.sql, entry, args.match)) for entry in tables]
    counts = [(entry, n) for entry, n in counts if n]
    if not counts:
        raise OperateError(f"retry: no error job matches {_describe(args)}; nothing to do")
    verb = "ignore" if args.ignore else "re-pend"
    done = "ignored" if args.ignore else "re-pended"
    total = 0
    for entry, expected in counts:
        if args.dry_run:
            print(f"would {verb} {expected} error job{'s' * (expected != 1)} of {entry.label}")
            continue
        changed = change(pipeline, entry, args.match, ignore=args.ignore, expected=expected)
        total += changed
        note = "" if args.ignore else " (their attempt counts reset)"
        print(f"{done} {changed} error job{'s' * (changed != 1)} of {entry.label}{note}")
    if args.dry_run:
        print("dry run: nothing changed")
    elif len(counts) > 1:
        print(f"{done} {total} error jobs in all")
    return 0
