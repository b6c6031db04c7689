"""A small but real DataJoint 2.x pipeline for the demo and the tests.

Subject (manual) → Session (manual) → Recording (imported: reads a "file" per session) →
Spikes (computed, with a part table per channel) → Summary (computed, slow: a long analysis).

Schema names start with ``$DJS_EXAMPLE_PREFIX`` (default ``djs_example``); ``DJS_EXAMPLE_SLOW_SECONDS``
(default 1.0) sets how long each Summary job takes.
"""

from .tables import Recording, Session, Spikes, Subject, Summary, schema, seed

__all__ = ["Recording", "Session", "Spikes", "Subject", "Summary", "schema", "seed"]
