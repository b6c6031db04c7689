"""The example pipeline's tables."""

from __future__ import annotations

import math
import os
import random
import time

import datajoint as dj

PREFIX = os.environ.get("DJS_EXAMPLE_PREFIX", "djs_example")
schema = dj.Schema(f"{PREFIX}_pipeline")

CHANNELS = 4


@schema
class Subject(dj.Manual):
    definition = """
    subject_id : int32
    ---
    species    : varchar(32)
    """


@schema
class Session(dj.Manual):
    definition = """
    -> Subject
    session_id : int32
    ---
    duration_s : float64      # length of the recording
    """


@schema
class Recording(dj.Imported):
    definition = """
    -> Session
    ---
    sample_rate : float64
    n_samples   : int64
    """

    def make(self, key):
        # a stand-in for reading the acquisition file of this session
        duration = (Session & key).fetch1("duration_s")
        rate = 1000.0
        self.insert1(dict(key, sample_rate=rate, n_samples=int(duration * rate)))


@schema
class Spikes(dj.Computed):
    definition = """
    -> Recording
    ---
    total_spikes : int64
    """

    class Channel(dj.Part):
        definition = """
        -> master
        channel : int16
        ---
        spike_count : int64
        """

    def make(self, key):
        n_samples = (Recording & key).fetch1("n_samples")
        rng = random.Random(f"{key['subject_id']}-{key['session_id']}")
        counts = [rng.randint(0, max(1, n_samples // 100)) for _ in range(CHANNELS)]
        self.insert1(dict(key, total_spikes=sum(counts)))
        self.Channel.insert(dict(key, channel=c, spike_count=n) for c, n in enumerate(counts))


@schema
class Summary(dj.Computed):
    definition = """
    -> Spikes
    ---
    rate_hz : float64     # mean firing rate per channel
    """

    def make(self, key):
        time.sleep(float(os.environ.get("DJS_EXAMPLE_SLOW_SECONDS", "1.0")))  # a long analysis
        total = (Spikes & key).fetch1("total_spikes")
        duration = (Session & key).fetch1("duration_s")
        self.insert1(dict(key, rate_hz=total / CHANNELS / max(duration, 1e-9)))


def seed(subjects: int = 3, sessions: int = 4) -> int:
    """Insert subjects and sessions (idempotent); returns how many sessions exist."""
    Subject.insert(({"subject_id": s, "species": "mouse"} for s in range(1, subjects + 1)), skip_duplicates=True)
    Session.insert(
        (
            {"subject_id": s, "session_id": n, "duration_s": 60.0 + 30 * math.sin(s * n)}
            for s in range(1, subjects + 1)
            for n in range(1, sessions + 1)
        ),
        skip_duplicates=True,
    )
    return len(Session())
