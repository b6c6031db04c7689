"""Many supervisors on one database: the fleet agent child, the registry and drain flags, and their CLI.

`agent` is the one child per supervisor that talks to the database on the parent's behalf, `link` the
parent's side of it (forks, feeds and restarts it); `view` is what the parent keeps of its answers (no
database code); `registry` reads and writes RegisteredWorker and
FleetFlag rows; `cli` and `queues` are the command line's views of them.
"""
