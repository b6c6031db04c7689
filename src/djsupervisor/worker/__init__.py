"""What runs in the user's own process and in every supervised child: the worker loop and its database work.

`loop` (DataJointWorker), `steps` (a table or a callable, run once per cycle, talking to the worker only
through the `StepHost` protocol), `progress` (the worker's activity and counters: the steps' host), `stop`
(how stop() and SIGTERM reach the loop), `record` (the worker's rows), `outage` (backoff and reconnects),
`events` (what the loop reports), `recovery` and `job_tables` (stale, orphaned and transient-error jobs back
to pending), `schema` (the worker tables), `connection` (fork-safe sessions and the server's view of live
ones), `identifiers` (SQL names, quoted here), `compat` (every use of DataJoint's internals, and the check
that the installed DataJoint fits them). Everything that talks to the database lives in this package or in
`djsupervisor.fleet`; the supervisor's parent process imports neither.
"""
