"""The workers `djsupervisor start pipelines.supervised` runs (standard, other and crasher), and the
module the supervisor tests' configs name as targets ("pipelines.supervised:standard"). They are defined,
with every other test worker, in `pipelines.workers`; this module picks the three a module start finds."""

from __future__ import annotations

from .workers import crasher, other, standard

__all__ = ["crasher", "other", "standard"]
