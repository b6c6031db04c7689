"""Each worker walks the pending jobs in its own order, and drops a list that has gone stale.

``populate(reserve_jobs=True)`` fetches the pending keys in DataJoint's order (priority, then scheduled time)
and tries to reserve each in turn. N workers fetch the same list and walk it in the same order: the first to
reach a key reserves it and the N-1 others each send a reservation the database refuses (a *lost*
reservation), so every job costs N-1 wasted round trips, all of them on the row another session is updating
at that moment (measured: bench/RESULTS.md, figure 10).

Here, by way of `djsupervisor.worker.compat.reordered_pending`, a worker shuffles the keys within each
priority (every key of a better priority still comes first: DataJoint's order within a priority, by scheduled
time, is all that is given up), each worker with its own random generator. Workers then rarely meet on a key.
When one does lose a reservation, the list it walks has gone stale: the rest of it is skipped without a
statement (`may_try` is False) and the next populate() call fetches the queue as it stands now. A worker thus
loses a reservation about once per list, not once per job of its fellows.

A populate() call limited to `max_calls` keys (a step's first call of a cycle takes 250) draws them from the
first ``SAMPLE_WINDOW`` times as many, so that workers starting together take different keys; a limited fetch
stays cheap (2,000 rows), where an unlimited one (a third of a second for 100k keys) would delay the first job.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable

#: A limited fetch draws its keys from this many times as many pending keys, in DataJoint's order.
SAMPLE_WINDOW = 8


class PendingWalk:
    """The order in which one worker walks a table's pending keys, and whether the list it walks is stale.

    `order` is the `compat.Reorder` of a populate() call; `lost` counts reservations lost since the worker
    started and marks the current list stale; `stale` says whether the last call ended on a lost reservation.
    """

    def __init__(self) -> None:
        self._random = random.Random()
        self._pid = os.getpid()
        self.lost = 0
        self.stale = False

    def order(self, fetch: Callable[[int | None], list[dict]], limit: int | None) -> list[dict]:
        """The keys a populate() call walks: `limit` (None: every) pending key, shuffled within each priority."""
        if self._pid != os.getpid():  # a forked child: not its parent's (and its siblings') sequence
            self._random, self._pid = random.Random(), os.getpid()
        self.stale = False
        rows = fetch(None if limit is None else limit * SAMPLE_WINDOW)
        keys: list[dict] = []
        for _, level in itertools.groupby(rows, key=lambda row: row["priority"]):
            group = [{k: v for k, v in row.items() if k != "priority"} for row in level]
            self._random.shuffle(group)
            keys += group
        return keys if limit is None else keys[:limit]

    def may_try(self) -> bool:
        """Whether to try the next key of the list (False once a reservation of it was lost)."""
        return not self.stale

    def lost_one(self) -> None:
        """A reservation was lost: count it, and skip the rest of this list."""
        self.lost += 1
        self.stale = True
