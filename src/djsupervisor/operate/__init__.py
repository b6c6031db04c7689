"""Operator tools run from the command line: `progress`, `errors` and `retry` (one module per command).

They read and write the pipeline's tables and job tables directly, from any host that reaches the database,
whether a supervisor runs there or not; the supervisor's parent never imports them (it does no database
work). `pipeline` finds the tables a configuration's workers populate and the job table of each.
"""


class OperateError(Exception):
    """A problem the user can fix (an unknown or ambiguous table, an empty selection): one line, exit 2.

    Declared here, away from the database modules, so that the command line can catch it without importing
    them (the supervisor's parent runs the same `main`)."""
