"""What runs in the user's own process and in every supervised child: the worker loop and its database work.

`loop` (DataJointWorker), `steps` (a table or a callable, run once per cycle), `events` (what the loop
reports), `recovery` (stale, orphaned and transient-error jobs back to pending), `schema` (the worker tables),
`connection` (fork-safe sessions and the server's view of live ones), `identifiers` (SQL names, quoted here).
Everything that talks to the database lives in this package or in `djsupervisor.fleet`; the supervisor's
parent process imports neither.
"""
