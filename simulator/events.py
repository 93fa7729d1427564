"""The discrete-event core: one heap of (time, sequence, handler, argument).

The sequence number breaks ties between events at the same instant in the order they were
scheduled, so a run never depends on comparing handlers or payloads and the same inputs always
replay identically. Randomness is not owned here: components receive one seeded `random.Random`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Handler = Callable[[Any], None]


class EventLoop:
    """A minimal heap loop; handlers schedule further events with `at`."""

    __slots__ = ("_heap", "_seq", "events", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Handler, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.events = 0

    def at(self, time: float, handler: Handler, arg: Any = None) -> None:
        """Run `handler(arg)` at `time` (never earlier than now)."""
        self._seq += 1
        heapq.heappush(self._heap, (time if time > self.now else self.now, self._seq, handler, arg))

    def run(self, until: float) -> None:
        """Process every event with time <= until, then leave `now` at `until`."""
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= until:
            time, _, handler, arg = pop(heap)
            self.now = time
            self.events += 1
            handler(arg)
        self.now = max(self.now, until)

    def run_while(self, keep_going: Callable[[], bool], limit: float) -> None:
        """Process events until `keep_going()` is false, the heap empties, or time passes `limit`."""
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= limit and keep_going():
            time, _, handler, arg = pop(heap)
            self.now = time
            self.events += 1
            handler(arg)

    @property
    def pending(self) -> int:
        return len(self._heap)
