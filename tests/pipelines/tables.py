"""A pipeline whose jobs misbehave on request: Source rows say how long make() takes, how much memory it
leaks, and whether it hangs. `declare(schema_name)` returns the table classes (tests and workers both)."""

from __future__ import annotations

import os
import time
import types

import datajoint as dj

_LEAKED: list[bytearray] = []  # memory a leaking make() keeps for the life of the process


def declare(schema_name: str, connection: dj.Connection | None = None) -> types.SimpleNamespace:
    """Declare Source (manual) → Square (computed) → Cube (computed) in `schema_name`."""
    schema = dj.Schema(schema_name, connection=connection or dj.conn())

    @schema
    class Source(dj.Manual):
        definition = """
        source_id : int32
        ---
        value : float64
        delay = 0 : float64     # seconds make() takes
        leak_mb = 0 : int32     # memory make() leaks
        hang = 0 : int32        # 1: make() never returns
        """

    @schema
    class Square(dj.Computed):
        definition = """
        -> Source
        ---
        square : float64
        worker_pid : int32
        """

        def make(self, key):
            value, delay, leak_mb, hang = (Source & key).fetch1("value", "delay", "leak_mb", "hang")
            if leak_mb:
                _LEAKED.append(bytearray(b"x") * (int(leak_mb) * 2**20))
            if hang:
                while True:
                    time.sleep(3600)
            if delay:
                time.sleep(float(delay))
            self.insert1(dict(key, square=value * value, worker_pid=os.getpid()))

    @schema
    class Cube(dj.Computed):
        definition = """
        -> Source
        ---
        cube : float64
        """

        def make(self, key):
            value = (Source & key).fetch1("value")
            self.insert1(dict(key, cube=value**3))

    # DataJoint declares a job table on first use of `.jobs`, and two processes doing it at once can fail on
    # PostgreSQL (DuplicateTable on its index): declare them here, before any worker or test process races.
    Square.jobs.progress()
    Cube.jobs.progress()
    return types.SimpleNamespace(schema=schema, Source=Source, Square=Square, Cube=Cube)


def seed(pipe: types.SimpleNamespace, ids, **columns) -> None:
    """Insert Source rows for `ids` with the given behaviour columns (delay=, leak_mb=, hang=)."""
    pipe.Source.insert([dict(source_id=i, value=float(i), **columns) for i in ids], skip_duplicates=True)
