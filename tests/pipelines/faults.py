"""A chained pipeline for fault tests: Source → Square → Cube (with a part table, written in two steps), with a
slow make() and an optional populate(processes=2) pool. The prefix comes from DJS_TEST_PREFIX;
DJS_TEST_DELAY sets make()'s time."""

from __future__ import annotations

import os
import time

import datajoint as dj

from djsupervisor import DataJointWorker

PREFIX = os.environ["DJS_TEST_PREFIX"]
DELAY = float(os.environ.get("DJS_TEST_DELAY", "0.2"))
dj.config["safemode"] = False
schema = dj.Schema(f"{PREFIX}_chain")


@schema
class Source(dj.Manual):
    definition = """
    source_id : int32
    ---
    value : float64
    """


@schema
class Square(dj.Computed):
    definition = """
    -> Source
    ---
    square : float64
    """

    def make(self, key):
        time.sleep(DELAY)
        value = (Source & key).fetch1("value")
        self.insert1(dict(key, square=value * value))


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

    def make(self, key):
        square = (Square & key).fetch1("square")
        self.insert1(dict(key, cube=square**1.5))
        time.sleep(DELAY)  # the transaction is open: a cut here must leave neither master nor parts
        self.Digit.insert(dict(key, position=p, digit=int(d)) for p, d in enumerate(f"{key['source_id']:03d}"))


Square.jobs.progress()  # declare the job tables before many processes race to
Cube.jobs.progress()

chain = DataJointWorker("chain", f"{PREFIX}_workers", sleep_duration=0.5, db_prefix=PREFIX)
chain(Square)
chain(Cube)

pooled = DataJointWorker("pooled", f"{PREFIX}_workers", sleep_duration=0.5, db_prefix=PREFIX)
pooled(Square, processes=2)
pooled(Cube)
