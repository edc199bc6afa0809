"""The processes of a data-parallel run (``mlx.launch``): who they are and the few things they agree on.

MLX's distributed layer (ring, MPI, JACCL) is the engine; this module only names the questions the
trainer and the checkpoint writer ask of it. In one process every function is a cheap no-op, so a
single-process run never touches ``mx.distributed``'s collectives.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import mlx.core as mx


class PeerLostError(RuntimeError):
    """Another process of the run stopped (killed, crashed, its machine gone) while this one waited
    on it; the run cannot go on, and its last complete checkpoint is where to resume."""


def group() -> mx.distributed.Group:
    """The run's process group (``mlx.launch`` sets it up; one process without it)."""
    return mx.distributed.init()


def rank() -> int:
    return group().rank()


def world_size() -> int:
    return group().size()


def is_main() -> bool:
    """Whether this process prints, writes metrics and writes the run's shared files (rank 0)."""
    return rank() == 0


def _collective(fn: Callable[..., mx.array], *args: mx.array) -> mx.array:
    try:
        out = fn(*args, stream=mx.cpu)
        mx.eval(out)
        return out
    except RuntimeError as e:
        raise PeerLostError(f"rank {rank()} of {world_size()}: lost the other processes ({e})") from None


@contextlib.contextmanager
def peers_needed(where: str) -> Iterator[None]:
    """Turn the backend's error for a lost process (raised by a collective inside an evaluation:
    the step's gradient average, mlx-lm's evaluation) into :class:`PeerLostError`."""
    try:
        yield
    except RuntimeError as e:
        if world_size() == 1:
            raise
        raise PeerLostError(
            f"rank {rank()} of {world_size()}: lost the other processes {where} ({e})") from None


def barrier() -> None:
    """Wait until every process is here (raises :class:`PeerLostError` if one is gone)."""
    if world_size() > 1:
        _collective(mx.distributed.all_sum, mx.array(0))


def broadcast_bytes(data: bytes, length: int) -> bytes:
    """Rank 0's ``data`` (at most ``length`` bytes, zero-padded) on every process."""
    if world_size() == 1:
        return data
    buffer = bytearray(length)
    if is_main():
        buffer[: len(data)] = data
    out = _collective(mx.distributed.all_sum, mx.array(list(buffer), mx.int32))
    return bytes(out.tolist()).rstrip(b"\0")


def gather_bytes(data: bytes, length: int) -> list[bytes]:
    """Every process's ``data`` (exactly ``length`` bytes each), in rank order."""
    if len(data) != length:
        raise ValueError(f"gather_bytes: expected {length} bytes, got {len(data)}")
    if world_size() == 1:
        return [data]
    out = _collective(mx.distributed.all_gather, mx.array(list(data), mx.uint8))
    flat = bytes(out.tolist())
    return [flat[i * length: (i + 1) * length] for i in range(world_size())]


def sum_floats(*values: mx.array) -> list[float]:
    """Scalars summed over every process (losses, token counts), as Python floats."""
    if world_size() == 1:
        return [float(v.item()) for v in values]
    stacked = mx.stack([v.astype(mx.float32) for v in values])
    return [float(x) for x in _collective(mx.distributed.all_sum, stacked).tolist()]
