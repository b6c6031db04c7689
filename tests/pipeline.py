"""A small pipeline for in-process worker tests: Source (manual) → Square (computed) → Cube (computed).

`make_pipeline(schema_name)` declares it in a fresh schema and returns its table classes. Behaviour knobs
are class attributes the tests set: `Square.fail_ids` (make raises), `Square.delay` (seconds per make),
`Square.on_make` (called with the key inside make, e.g. to request a stop mid-job).
"""

from __future__ import annotations

import time
import types

import datajoint as dj


def make_pipeline(schema_name: str, connection: dj.Connection | None = None) -> types.SimpleNamespace:
    """Declare Source, Square and Cube in `schema_name`; return them in a namespace."""
    schema = dj.Schema(schema_name, connection=connection or dj.conn())

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
        fail_ids: set = set()
        delay = 0.0
        on_make = None

        def make(self, key):
            if type(self).on_make is not None:
                type(self).on_make(key)
            if type(self).delay:
                time.sleep(type(self).delay)
            if key["source_id"] in type(self).fail_ids:
                raise ValueError(f"bad source {key['source_id']}")
            value = (Source & key).fetch1("value")
            self.insert1(dict(key, square=value * value))

    @schema
    class Cube(dj.Computed):
        definition = """
        -> Square
        ---
        cube : float64
        """

        def make(self, key):
            square = (Square & key).fetch1("square")
            self.insert1(dict(key, cube=square**1.5))

    return types.SimpleNamespace(schema=schema, Source=Source, Square=Square, Cube=Cube)


def seed(pipeline: types.SimpleNamespace, n: int) -> None:
    """Insert `n` Source rows (ids 1..n)."""
    pipeline.Source.insert([dict(source_id=i, value=float(i)) for i in range(1, n + 1)], skip_duplicates=True)
