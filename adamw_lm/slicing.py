"""How one step of :class:`adamw_lm.AdamW` is laid out for mlx: tensors in slices spread over
streams ("lanes"), small tensors laid end to end in bins (:func:`adamw_lm.memory.update_bins`),
each tensor's random keys, and the check of the gradients every slice waits for.

None of it changes a result: a tensor updated whole, in slices, in a bin, on any stream or in a
process holding a share of the parameters draws the same bits and gets the same values.
"""

from __future__ import annotations

import functools
import itertools
import threading
import zlib
from typing import Callable, NamedTuple, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .codecs import MomentCodec, Precision, Stored
from .codecs.bf16 import key_start, starts_at


@functools.lru_cache(maxsize=65536)
def _path_crcs(path: str) -> tuple[int, int]:
    """Two 32-bit hashes of a parameter's path (CRC-32 from two start values)."""
    data = path.encode()
    return zlib.crc32(data), zlib.crc32(data, 0x9E3779B9)


#: Per float dtype: the signed and unsigned integers of its size, and the bits of ``+inf`` and
#: ``-inf`` in them. An element is NaN or infinite exactly where its bits, as the signed integer,
#: reach ``+inf``'s (positive ones: negative floats are negative integers) or, as the unsigned
#: one, ``-inf``'s (negative ones: every other float's bits are below).
_INFINITIES = {
    mx.float16: (mx.int16, mx.uint16, 0x7C00, 0xFC00),
    mx.bfloat16: (mx.int16, mx.uint16, 0x7F80, 0xFF80),
    mx.float32: (mx.int32, mx.uint32, 0x7F800000, 0xFF800000),
    mx.float64: (mx.int64, mx.uint64, 0x7FF0000000000000, 0xFFF0000000000000),
}


def all_finite(tensors: Sequence[mx.array], streams: int | None = None) -> mx.array:
    """Whether every element of the floating ``tensors`` is finite (a scalar bool array).

    Two integer maxima per tensor, over its bits (see ``_INFINITIES``): reductions without a
    per-element test, 0.75 ns per float32 element against 0.97 for a sum (which also overflowed
    for finite gradients past ~1e28) and 0.22 against 1.15 per bfloat16 element. Every step
    waits for this check, so the tensors are spread over the ``streams`` the slices use.
    """
    lanes = _lanes(streams)
    maxima: dict[mx.Dtype, tuple[list, list]] = {}
    for i, t in enumerate(t for t in tensors if t.size):
        if t.dtype not in _INFINITIES:
            raise TypeError(f"gradients must be floating point; got {t.dtype}")
        signed, unsigned, _, _ = _INFINITIES[t.dtype]
        with mx.stream(lanes[i % len(lanes)]):
            pair = maxima.setdefault(t.dtype, ([], []))
            pair[0].append(mx.max(mx.view(t, signed)))
            pair[1].append(mx.max(mx.view(t, unsigned)))
    finite = mx.array(True)
    for dtype, (highest_signed, highest_unsigned) in maxima.items():
        signed, unsigned, positive, negative = _INFINITIES[dtype]
        finite = (
            finite
            & mx.all(mx.stack(highest_signed) < mx.array(positive, dtype=signed))
            & mx.all(mx.stack(highest_unsigned) < mx.array(negative, dtype=unsigned))
        )
    return finite


_LANES: dict[tuple[int, str], list[mx.Stream]] = {}


def default_streams() -> int:
    """Streams an :class:`AdamW` with ``streams=None`` uses: 1.

    More streams run slices side by side (on a CPU each stream has its own thread), which speeds
    the optimizer's step alone on a CPU, but in a training step, evaluated with the backward pass,
    the lanes run ahead of each other and keep old weights and moments of many tensors alive:
    measured by ``scripts/bench_memory.py``, two lanes raised the peak of a bf16-state step by
    ~40 % of the weights + state over one (``docs/benchmarks.md``). ``streams=2`` stays available.
    """
    return 1


def _lanes(streams: int | None) -> list[mx.Stream]:
    """The streams slices are spread over: the default one first, then extra ones, made once per
    thread and device (mlx streams belong to the thread that makes them)."""
    device = mx.default_device()
    streams = streams or default_streams()
    made = _LANES.setdefault((threading.get_ident(), str(device)), [])
    while len(made) < streams - 1:
        made.append(mx.new_stream(device))
    return [mx.default_stream(device), *made[: streams - 1]]


class Slices:
    """Updates the tensors of one step in slices of ``chunk`` elements spread over streams.

    Slices take the streams ("lanes") in turn, across tensors too, and each waits for the previous
    slice of its lane: evaluated in sequence, one slice's decoded moments and temporaries are freed
    before the next one's exist.
    """

    def __init__(self, streams: int | None, chunk: int):
        self.lanes = _lanes(streams)
        self.chains: list[list[mx.array]] = [[] for _ in self.lanes]
        self.turns = itertools.count()
        self.chunk = chunk

    def update(self, fn: Callable, tensors: dict, codecs: Precision, *constants) -> dict:
        """``fn(tensors, *constants, offset)`` over the slices of ``tensors`` (``"m"`` and ``"v"``
        stored by ``codecs``, the others of the parameter's shape), joined."""
        shape, size = tensors["p"].shape, tensors["p"].size
        parts = []
        # An empty tensor is one (empty) slice: its state goes through the codecs all the same.
        for start in range(0, max(size, 1), self.chunk):
            stop = min(start + self.chunk, size)
            lane = next(self.turns) % len(self.lanes)
            previous = self.chains[lane]
            # Slicing too happens in the lane: a view made on another stream would wait there.
            with mx.stream(self.lanes[lane]):
                part = tensors if stop - start == size else {
                    name: _slice_stored(getattr(codecs, name, None), a, start, stop)
                    for name, a in tensors.items()
                }  # fmt: skip
                if previous:
                    part = {**part, "g": mx.depends(part["g"], previous)}
                # The offset waits for the slice too: random bits that depend on the key alone
                # would be drawn for every slice at once, ahead of the chain.
                offset = mx.depends(mx.array(start, mx.uint32), part["g"])
                out = fn(part, *constants, offset)
            previous[:] = [a for _, a in tree_flatten(out)]
            parts.append(out)
        if len(parts) == 1:
            return parts[0]
        joined = {name: _join_stored([part[name] for part in parts], shape) for name in parts[0]}
        # The joins join the chains too, or they would all run last, with every slice alive.
        for chain in self.chains:
            chain[:] = [a for _, a in tree_flatten(joined)]
        return joined


class StepKeys:
    """A step's random keys: per tensor, as the codecs and the weight update take them, or per
    element for tensors laid end to end (:func:`adamw_lm.codecs.bf16.starts_at`), each drawing the
    bits it draws alone."""

    def __init__(
        self, step: mx.array, step_key: mx.array | None, stochastic: list[str], weighted: list[str]
    ):
        self.step = step
        self.index = {path: i for i, path in enumerate(stochastic)}
        self.weighted = {path: i for i, path in enumerate(weighted)}
        self._solo: dict[str, list[mx.array]] = {}
        self._step: mx.array | None = None
        self._pairs: mx.array | None = None
        if not stochastic:
            return
        # A parameter's key comes from this step's key and its path, not from its place among
        # the stochastic parameters: a process holding a share of them (ShardedOptimizer) draws
        # for them what the whole optimizer draws. One (n, 2) array of keys and one hash for
        # all of them: each scalar operation is a dispatch to the stream's thread.
        tensor_keys = step_key ^ mx.array([_path_crcs(p) for p in stochastic], mx.uint32)
        self.starts = key_start(tensor_keys)
        if weighted:
            # The moments of a bf16 pair use both halves of their key's hash: the weight rounds
            # with bits of a key drawn from it.
            rows = mx.array([self.index[path] for path in weighted])
            drawn = mx.vmap(lambda key: mx.random.split(key, 1)[0])(tensor_keys[rows])
            self.weight_starts = key_start(drawn)

    def _start(self, name: str, paths: list[str], sizes: list[int]) -> mx.array:
        starts, index = (self.starts, self.index) if name == "moments" else (
            self.weight_starts, self.weighted
        )  # fmt: skip
        if len(paths) > 1:
            return starts_at(mx.take(starts, mx.array([index[p] for p in paths])), sizes)
        # 0-d: mx.compile passes a scalar into its kernels as a constant, where a (1,) array
        # would be a broadcast input and make the hash's kernel strided. One split for all.
        if name not in self._solo:
            self._solo[name] = mx.split(starts, starts.size)
        return self._solo[name][index[paths[0]]].squeeze(0)

    def moments(
        self, paths: list[str], sizes: list[int], codecs: Precision
    ) -> tuple[mx.array | tuple | None, ...]:
        """The keys of ``codecs``' two moments for ``paths`` (one tensor, or a bin)."""
        keys: list[mx.array | tuple | None] = []
        fresh = None
        for codec in (codecs.m, codecs.v):
            if codec.rotating:
                keys.append(self._rotating(paths, sizes))
            elif codec.stochastic:
                # Codecs that draw fresh bits share one key (their halves of one hash).
                fresh = self._start("moments", paths, sizes) if fresh is None else fresh
                keys.append(fresh)
            else:
                keys.append(None)
        return tuple(keys)

    def _rotating(self, paths: list[str], sizes: list[int]) -> mx.array | tuple:
        # A rotating codec's phases must stay the same from step to step, so they come from the
        # path, not from the state's key (nor from ``seed``, which a resumed state does not
        # carry): the same in every run and every process. Its key: (the path's CRC, the step).
        if self._step is None:
            self._step = self.step.astype(mx.uint32)
            self._pairs = self._step * mx.array([0, 1], mx.uint32)
        if len(paths) == 1:
            return mx.array([_path_crcs(paths[0])[0], 0], mx.uint32) + self._pairs
        seeds = mx.array([[_path_crcs(p)[0], 0] for p in paths], mx.uint32)
        return starts_at(key_start(seeds), sizes), self._step

    def weight(self, paths: list[str], sizes: list[int]) -> mx.array | None:
        """The key of the stochastic weight update of ``paths``, if theirs is one."""
        return self._start("weight", paths, sizes) if paths[0] in self.weighted else None


def join_flat(parts: list[mx.array]) -> mx.array:
    """``parts`` flattened and laid end to end."""
    # reshape(size): mlx gives a flat array back as it is, with no operation to dispatch.
    return mx.concatenate([part.reshape(part.size) for part in parts])


class Bin(NamedTuple):
    """Tensors of parameters updated as one, laid end to end."""

    paths: list[str]
    sizes: list[int]
    shapes: list[tuple[int, ...]]
    #: ``{"g", "p", "m", "v"[, "buffer"]}`` of all of them, joined: flat arrays, or a block-wise
    #: moment's codes and scales, whose rows are whole blocks.
    tensors: dict

    @classmethod
    def join(cls, paths: list[str], tensors: list[dict]) -> Bin:
        """The bin of ``paths``, whose tensors (``{"g", "p", "m", "v"[, "buffer"]}`` of one
        parameter each) are ``tensors``."""

        def join(parts: list[Stored]) -> Stored:
            # Codes viewed as words (_concatenate: a CPU copies element by element), the rest as
            # it is: for 4-byte elements a view per part costs what it saves (measured: with
            # views for the codes only, -3 % for an int8 LoRA step; for everything, +1 to +7 %).
            if isinstance(parts[0], dict):
                return {key: (_concatenate if parts[0][key].dtype.size == 1 else mx.concatenate)(
                    [part[key] for part in parts]) for key in parts[0]}  # fmt: skip
            return join_flat(parts)

        return cls(
            paths, [t["p"].size for t in tensors], [t["p"].shape for t in tensors],
            {name: join([t[name] for t in tensors]) for name in tensors[0]},
        )  # fmt: skip

    def cut(self, joined: dict) -> list[dict]:
        """``joined`` (the bin's new tensors, as :attr:`tensors`) cut back into each tensor's."""
        bounds = list(itertools.accumulate(self.sizes[:-1]))
        cut: list[dict] = [{} for _ in self.paths]
        for name, stored in joined.items():
            if isinstance(stored, dict):
                for key, a in stored.items():
                    # Rows of whole blocks: each tensor's are its elements over the block.
                    per_row = sum(self.sizes) // a.shape[0]
                    for part, rows in zip(cut, mx.split(a, [b // per_row for b in bounds])):
                        part.setdefault(name, {})[key] = rows
            else:
                for part, shape, a in zip(cut, self.shapes, mx.split(stored, bounds)):
                    part[name] = a.reshape(shape)
        return cut


def _slice_stored(codec: MomentCodec | None, stored: Stored, start: int, stop: int) -> Stored:
    """Elements ``[start, stop)`` of a stored moment (``start`` a multiple of the codec's block), or
    of a plain tensor (``codec`` ``None``)."""
    if isinstance(stored, dict):
        first, last = start // codec.block, -(-stop // codec.block)
        return {name: a[first:last] for name, a in stored.items()}
    # reshape(size), not reshape(-1): mlx returns an array already of that shape as it is, where
    # any other reshape is one more operation for the stream's thread (see _concatenate).
    return stored.reshape(stored.size)[start:stop]


def _join_stored(parts: list[Stored], shape: tuple[int, ...]) -> Stored:
    """The stored moment of ``shape`` made of consecutive slices ``parts``."""
    if isinstance(parts[0], dict):
        return {name: _concatenate([part[name] for part in parts]) for name in parts[0]}
    return _concatenate(parts).reshape(shape)


def _concatenate(parts: list[mx.array]) -> mx.array:
    """``mx.concatenate(parts)`` (along the first axis), 8 bytes at a time where the parts allow:
    a CPU concatenates element by element, as slow for a 1-byte code as for a float32 (measured
    in docs/benchmarks.md, "Square roots without sqrt"). Each part's rows are viewed as words,
    without flattening: every operation, a reshape too, is a dispatch to the stream's thread,
    which sleeps between cheap ones (docs/benchmarks.md, "Timed in phases")."""
    if parts[0].dtype.size >= 8 or any(part.shape[-1] * part.dtype.size % 8 for part in parts):
        return mx.concatenate(parts)
    return mx.view(mx.concatenate([mx.view(part, mx.uint64) for part in parts]), parts[0].dtype)


__all__ = ["Bin", "Slices", "StepKeys", "all_finite", "default_streams", "join_flat"]
