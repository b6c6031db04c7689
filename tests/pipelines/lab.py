"""The one test pipeline: Source (manual) → Square (computed) → Cube (computed, with a part table).

Behaviour is data. A Source row says what the jobs of its key do: `delay` (seconds make() sleeps),
`leak_mb` (memory make() keeps for the life of its process), `kill` (make() SIGKILLs its own process),
`hang` (make() never returns), `fail` (make() raises ValueError with that message). A test states what
a job does by the row it inserts (``lab.seed([3], fail="bad source 3")``), and every process that works
the key reads the same row: the test's own, a worker script it starts, a supervisor's child, a populate
pool's grandchild. Class attributes reached only the process that set them, environment variables only
processes started after they were set; both made three pipelines out of one.

Each computed table acts out its key's behaviour in make(): Square before it inserts its row, Cube
between its master row and its parts, inside make()'s transaction, so that a kill or cut there must
leave neither master nor parts. Square records the pid that computed it and when make() started and
finished, so tests and benchmarks read who did a job and when from the database.

`declare(schema_name)` declares the tables in one schema and returns them as a `Lab`; the schema name
(and with it the prefix) is always the caller's: a test passes ``db.schema_name("pipe")``, the worker
definitions in `pipelines.workers` build it from DJS_TEST_PREFIX, the benchmarks from DJS_BENCH_PREFIX.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

import datajoint as dj

BEHAVIOUR = ("delay", "leak_mb", "kill", "hang", "fail")  # Source's behaviour columns, in the order acted out

_LEAKED: list[bytearray] = []  # memory a leaking make() keeps for the life of the process


@dataclasses.dataclass(frozen=True)
class Lab:
    """The test pipeline's schema and table classes, as `declare` returns them."""

    schema: dj.Schema
    Source: Any  # the table classes DataJoint builds inside `declare`
    Square: Any
    Cube: Any

    def seed(self, ids: Iterable[int], **behaviour: Any) -> None:
        """Insert Source rows for `ids` (value = the id) with the given behaviour columns; rows already
        there are left as they are."""
        unknown = set(behaviour) - set(BEHAVIOUR)
        if unknown:
            raise TypeError(f"not a behaviour column: {sorted(unknown)}")
        rows = [dict(source_id=i, value=float(i), **behaviour) for i in ids]
        self.Source.insert(rows, skip_duplicates=True)

    def set_behaviour(self, restriction: Any = True, **behaviour: Any) -> None:
        """Change the behaviour columns of the Source rows matching `restriction` (all, by default): jobs
        that start afterwards, in any process, act on the new values."""
        for key in (self.Source & restriction).keys():
            self.Source.update1(dict(key, **behaviour))


def act_out(row: dict) -> None:
    """Do what a Source row's behaviour columns ask, in the order of `BEHAVIOUR`: leak, sleep, die, hang,
    fail (so that a row can say "work 2 s, then die")."""
    if row["leak_mb"]:
        _LEAKED.append(bytearray(b"x") * (int(row["leak_mb"]) * 2**20))
    if row["delay"]:
        time.sleep(float(row["delay"]))
    if row["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if row["hang"]:
        while True:
            time.sleep(3600)
    if row["fail"]:
        raise ValueError(row["fail"])


def declare(schema_name: str, connection: dj.Connection | None = None, *, job_tables: bool = True) -> Lab:
    """Declare Source → Square → Cube (and Cube.Digit) in `schema_name` and return them.

    With `job_tables` (the default), Square's and Cube's job tables are declared too: DataJoint declares a
    job table on first use of `.jobs`, and two processes doing it at once can fail on PostgreSQL
    (DuplicateTable on its index), so a test declares them before any worker or test process races.
    Tests of that very race, or of which job tables exist, pass ``job_tables=False``.
    """
    schema = dj.Schema(schema_name, connection=connection or dj.conn())

    @schema
    class Source(dj.Manual):
        definition = """
        source_id : int32
        ---
        value : float64
        delay = 0 : float64           # seconds make() sleeps
        leak_mb = 0 : int32           # MiB make() allocates and keeps for the life of its process
        kill = 0 : int32              # 1: make() SIGKILLs its own process
        hang = 0 : int32              # 1: make() never returns
        fail = "" : varchar(255)      # not empty: make() raises ValueError(fail)
        """

    @schema
    class Square(dj.Computed):
        definition = """
        -> Source
        ---
        square : float64
        worker_pid : int32            # the process that computed it
        started : float64             # time.time() when make() began
        finished : float64            # time.time() just before the insert
        """

        def make(self, key: dict) -> None:
            started = time.time()
            row = (Source() & key).fetch1()
            act_out(row)
            square = row["value"] * row["value"]
            self.insert1(dict(key, square=square, worker_pid=os.getpid(), started=started, finished=time.time()))

    @schema
    class Cube(dj.Computed):
        definition = """
        -> Square
        ---
        cube : float64
        """

        class Digit(dj.Part):
            definition = """
            -> master
            position : int16
            ---
            digit : int16
            """

        def make(self, key: dict) -> None:
            square = (Square() & key).fetch1("square")
            self.insert1(dict(key, cube=square**1.5))
            act_out((Source() & key).fetch1())  # the transaction is open: a cut here leaves neither master nor parts
            digits = f"{key['source_id']:03d}"
            self.Digit.insert(dict(key, position=p, digit=int(d)) for p, d in enumerate(digits))

    if job_tables:
        Square.jobs.progress()
        Cube.jobs.progress()
    return Lab(schema, Source, Square, Cube)
