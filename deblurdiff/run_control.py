"""Cancel flags and step counters shared with the process that runs the model.

On ZeroGPU the GPU function runs in a worker process forked from the app's process, so
a Python set or a ``threading.Event`` set by the app's Cancel button is a copy the
worker never sees. These counters live in shared memory allocated when the app starts,
before any worker is forked, so both processes read and write the same cells: the app
sets a run's cancel flag and reads its progress; the worker reports each step and
stops when the flag is set. Without ZeroGPU both sides are the same process.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading

_CANCEL, _DONE, _TOTAL = range(3)


class RunControl:
    def __init__(self, slots: int = 64):
        self._cells = multiprocessing.RawArray(ctypes.c_int64, 3 * slots)
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def acquire(self, total: int = 0) -> int:
        """A cleared slot for a new run (total steps as given, none done)."""
        with self._lock:
            if not self._free:
                raise RuntimeError("too many runs at once")
            slot = self._free.pop()
        self._cells[3 * slot + _CANCEL] = 0
        self.report(slot, 0, total)
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free:
                self._free.append(slot)

    def cancel(self, slot: int) -> None:
        self._cells[3 * slot + _CANCEL] = 1

    def cancelled(self, slot: int) -> bool:
        return bool(self._cells[3 * slot + _CANCEL])

    def report(self, slot: int, done: int, total: int) -> None:
        # Total first: a reader never sees more steps done than there are.
        self._cells[3 * slot + _TOTAL] = int(total)
        self._cells[3 * slot + _DONE] = int(done)

    def progress(self, slot: int) -> tuple[int, int]:
        return int(self._cells[3 * slot + _DONE]), int(self._cells[3 * slot + _TOTAL])
