"""Give the heap's freed memory back to the operating system after a round.

A long-lived process (the server with 100 replicas' updates in one round) frees what a round
used, but glibc's malloc keeps the freed pages of its arenas for reuse: the process's resident
memory stays at the round's high-water mark, and the memory monitor rightly counts it as held.
``malloc_trim(0)`` returns the free pages at the top and inside the arenas (glibc >= 2.8). No-op
where there is no glibc.
"""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    gc.collect()  # cycles first: what they hold is freed before the trim
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own libc, as services.lifetime finds prctl
    if trim is not None:
        trim(0)
