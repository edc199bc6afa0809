"""Worker threads for hashing and fsync (no mlx calls run on them)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def threads(purpose: str) -> ThreadPoolExecutor:
    # Hashing and syncing tasks never wait on other tasks: with one pool per purpose, no task can
    # wait on work queued behind it.
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"adamw_lm-checkpoint-{purpose}")
