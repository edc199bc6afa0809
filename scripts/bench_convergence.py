#!/usr/bin/env python3
"""Does a low-precision optimizer state converge like float32 moments? Small deterministic problems.

Each problem is trained full-batch for ``--steps`` steps of AdamW (cosine schedule from 1e-2 down to
1e-4, no weight decay, every tensor quantized: ``min_quantize_size=0``) at each state precision; the
final loss is compared with the same run at ``state_precision="fp32"`` (float32 moments). The step
time column is the fastest ``apply_gradients`` on a Llama-like tree (``--hidden``, ``--layers``, as
in ``scripts/bench_optimizer.py``) divided by ``mlx.optimizers.AdamW``'s, measured side by side.

Prints one markdown table. ``tests/test_convergence.py`` runs the same problems with bounds.
``--candidates`` adds the storage formats that were measured against each other when the int8 and
int4 formats were chosen (docs/benchmarks.md).

Usage: python scripts/bench_convergence.py [--steps 300] [--hidden 512] [--layers 2] [--candidates]
       [--draws N] [--jobs N]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from adamw_lm import AdamW
from adamw_lm.codecs import PRECISIONS, Precision

Problem = Callable[[], tuple[dict, Callable[[dict], mx.array]]]


def least_squares(condition: float = 1.0, seed: int = 0) -> tuple[dict, Callable]:
    """Multi-output least squares, 512 samples x 256 Gaussian features -> 32 outputs, no noise;
    feature ``j`` scaled by ``condition^(-j/255)`` (the Hessian's condition number is
    ``condition^2``)."""
    k = iter(mx.random.split(mx.random.key(seed), 2))
    x = mx.random.normal((512, 256), key=next(k))
    if condition != 1.0:
        x = x * mx.power(condition, -mx.arange(256) / 255)
    y = x @ mx.random.normal((256, 32), key=next(k))
    return {"w": mx.zeros((256, 32))}, lambda p: 0.5 * mx.mean(mx.square(x @ p["w"] - y))


def logistic_regression(seed: int = 0) -> tuple[dict, Callable]:
    """16 independent logistic regressions on 1024 samples x 256 Gaussian features, labels drawn
    from a random teacher's probabilities (so the optimum has a positive loss)."""
    k = iter(mx.random.split(mx.random.key(seed), 3))
    x = mx.random.normal((1024, 256), key=next(k))
    logits = x @ (mx.random.normal((256, 16), key=next(k)) / 4)
    y = (mx.random.uniform(shape=logits.shape, key=next(k)) < mx.sigmoid(logits)).astype(mx.float32)

    def loss(p):
        return mx.mean(nn.losses.binary_cross_entropy(x @ p["w"] + p["b"], y, with_logits=True))

    return {"w": mx.zeros((256, 16)), "b": mx.zeros((16,))}, loss


def mlp(seed: int = 0) -> tuple[dict, Callable]:
    """A 32-128-4 tanh network fitted to a random 32-16-4 tanh teacher on 4096 samples, targets
    with noise of standard deviation 0.1 (more targets than parameters: the loss levels off above
    the noise's 0.005 instead of fitting the noise)."""
    k = iter(mx.random.split(mx.random.key(seed), 6))
    x = mx.random.normal((4096, 32), key=next(k))
    teacher = mx.random.normal((32, 16), key=next(k)) * (2 / math.sqrt(32))
    y = mx.tanh(x @ teacher) @ mx.random.normal((16, 4), key=next(k))
    y = y + 0.1 * mx.random.normal(y.shape, key=next(k))
    params = {
        "w1": mx.random.normal((32, 128), key=next(k)) / math.sqrt(32),
        "b1": mx.zeros((128,)),
        "w2": mx.random.normal((128, 4), key=next(k)) / math.sqrt(128),
    }

    def loss(p):
        return 0.5 * mx.mean(mx.square(mx.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y))

    return params, loss


#: Each problem by name, as a function of the seed of its random draw.
DRAWS: dict[str, Callable[[int], tuple[dict, Callable]]] = {
    "least squares": lambda seed: least_squares(seed=seed),
    "least squares, cond 1e4": lambda seed: least_squares(condition=100.0, seed=seed),
    "logistic regression": lambda seed: logistic_regression(seed=seed),
    "MLP": lambda seed: mlp(seed=seed),
}

PROBLEMS: dict[str, Problem] = {name: (lambda draw=draw: draw(0)) for name, draw in DRAWS.items()}


def final_loss(problem: Problem, precision: str, steps: int = 300) -> float:
    """The loss after ``steps`` full-batch AdamW steps with moments at ``precision``."""
    params, loss = problem()
    schedule = optim.cosine_decay(1e-2, steps, 1e-4)
    opt = AdamW(schedule, state_precision=precision, min_quantize_size=0, weight_decay=0.0)
    value_and_grad = mx.value_and_grad(loss)
    for _ in range(steps):
        _, grads = value_and_grad(params)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
    return loss(params).item()


def final_loss_of_draw(problem: str, draw: int, precision: str, steps: int = 300) -> float:
    """:func:`final_loss` of draw ``draw`` of ``DRAWS[problem]``: arguments a process can take."""
    return final_loss(lambda: DRAWS[problem](draw), precision, steps)


def final_losses(
    cases: list[tuple[str, int, str]],
    steps: int = 300,
    jobs: int = 1,
    with_candidates: bool = False,
) -> list[float]:
    """:func:`final_loss_of_draw` of each ``(problem, draw, precision)``, in ``jobs`` processes
    (each run is deterministic and single-threaded, so this gives the same losses, sooner);
    ``with_candidates``: the processes register :func:`candidates` first."""
    if jobs <= 1:
        return [final_loss_of_draw(*case, steps) for case in cases]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding mlx's threads
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=candidates if with_candidates else None
    ) as pool:
        return list(pool.map(final_loss_of_draw, *zip(*cases), [steps] * len(cases)))


def step_time_ratios(precisions: list[str], hidden: int, layers: int, steps: int) -> dict:
    """Fastest step time of each precision over that of mlx AdamW timed beside it (see
    ``bench_optimizer.time_in_phases``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_optimizer import MLX, gradient_like, llama_like_tree, time_in_phases

    weights = llama_like_tree(hidden, layers)
    grads = gradient_like(weights)
    makers = {MLX: lambda: optim.AdamW(1e-3)}
    makers.update({p: (lambda p=p: AdamW(1e-3, state_precision=p)) for p in precisions})
    # The fastest step, not the median: on a machine shared with other jobs it is the one least
    # slowed by them. Two warm-up steps compile.
    timed = time_in_phases(makers, weights, grads, 2, steps)
    return {p: min(t) / min(base) for p, (t, base) in timed.items()}


def candidates() -> list[str]:
    """Register the formats measured when int8 and int4 were chosen; returns their names."""
    from adamw_lm.codecs.blockwise import Blockwise, PowerMap, ShiftRootMap

    def pair(bits: int, m: tuple, v: tuple, as_step: bool = False) -> Precision:
        """``m``, ``v``: (power, stochastic[, rotating]); ``as_step``: m stored as
        ``m / (sqrt(v) + eps)``."""
        block = 256 if bits == 8 else 128
        m_rotating = len(m) > 2 and m[2]
        return Precision(
            f"int{bits} m{'/√v' if as_step else ''} p{m[0]}{' SR' if m[1] else ''}"
            f"{' rot' if m_rotating else ''}, v p{v[0]}{' SR' if v[1] else ''}",
            Blockwise(
                PowerMap(bits, True, m[0]), block, stochastic=m[1], rotating=m_rotating,
                name="step_levels" if as_step else "levels",
            ),
            Blockwise(PowerMap(bits, False, v[0]), block, stochastic=v[1], half=0),
            m_over_root_v=as_step,
        )

    tried = [
        pair(bits, m, v)
        for bits in (8, 4)
        for m, v in [
            ((2, False), (2, False)),  # the same levels, rounded to nearest
            ((2, True), (2, True)),  # fresh noise for m too (int8's choice)
            ((2, True, True), (2, True)),  # rotating noise for m (int4's before m/√v)
            ((1, True), (1, True)),  # linear levels
            ((4, True), (4, True)),  # fourth-root companding
            ((2, True), (2, False)),  # v rounded to nearest
            ((2, True), (4, True)),
        ]
    ] + [
        # The first moment stored as its step (int4's choice, with rotating noise).
        pair(8, (2, True), (2, True), as_step=True),
        pair(4, (2, True), (2, True), as_step=True),
        pair(4, (1, True, True), (2, True), as_step=True),
    ] + [
        # int4's first moment on int8's shift-root levels (session 8).
        Precision(
            "int4 m/√v shift root SR rot, v p2 SR",
            Blockwise(ShiftRootMap(4, True), 128, rotating=True, name="step_root_levels"),
            Blockwise(PowerMap(4, False, 2), 128, half=0),
            m_over_root_v=True,
        ),
    ]
    for precision in tried:
        PRECISIONS[precision.name] = precision
    return [p.name for p in tried]


def print_draws(args: argparse.Namespace, precisions: list[str]) -> None:
    """The table over ``args.draws`` draws of each problem: differences to float32 moments."""
    start = time.perf_counter()
    print(f"{args.steps} full-batch steps, cosine 1e-2 -> 1e-4, draws 0-{args.draws - 1} of each "
          f"problem; mlx {mx.__version__}, {mx.default_device()}.\n")  # fmt: skip
    print("| problem | state | vs fp32, mean ± std | largest |")
    print("|---|---|---:|---:|")
    draws = range(args.draws)
    cases = [(name, d, p) for name in DRAWS for p in ["fp32", *precisions] for d in draws]
    losses = dict(zip(cases, final_losses(cases, args.steps, args.jobs, args.candidates)))
    for name in DRAWS:
        for precision in precisions:
            diffs = [100 * (losses[name, d, precision] / losses[name, d, "fp32"] - 1)
                     for d in draws]  # fmt: skip
            spread = f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f} %"
            print(f"| {name} | {precision} | {spread} | {max(diffs):+.1f} % |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps per problem")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the timing tree")
    parser.add_argument("--layers", type=int, default=2, help="layers of the timing tree")
    parser.add_argument("--time-steps", type=int, default=9, help="timed steps per optimizer")
    parser.add_argument("--candidates", action="store_true", help="also the formats not chosen")
    parser.add_argument(
        "--draws", type=int, default=1,
        help="random draws of each problem (seeds 0, 1, ...); above 1, the table gives the mean "
        "± standard deviation and the largest difference over the draws, and no final loss",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes running the --draws runs side by side"
    )
    args = parser.parse_args()
    if min(args.steps, args.hidden, args.layers, args.time_steps, args.draws, args.jobs) < 1:
        parser.error("--steps, --hidden, --layers, --time-steps, --draws and --jobs must be >= 1")
    precisions = [p for p in PRECISIONS if p != "fp32"]
    if args.candidates:
        precisions += candidates()
    if args.draws > 1:
        print_draws(args, precisions)
        return

    start = time.perf_counter()
    ratios = step_time_ratios(["fp32", *precisions], args.hidden, args.layers, args.time_steps)
    print(
        f"{args.steps} full-batch steps, cosine 1e-2 -> 1e-4; step time on a {args.layers}-layer "
        f"tree of hidden {args.hidden}, fastest of {args.time_steps}; mlx {mx.__version__}, "
        f"{mx.default_device()}.\n"
    )
    print("| problem | state | final loss | vs fp32 | step time ÷ mlx AdamW |")
    print("|---|---|---:|---:|---:|")
    for name, problem in PROBLEMS.items():
        reference = final_loss(problem, "fp32", args.steps)
        print(f"| {name} | fp32 | {reference:.5g} | | {ratios['fp32']:.2f} |", flush=True)
        for precision in precisions:
            loss = final_loss(problem, precision, args.steps)
            print(
                f"| {name} | {precision} | {loss:.5g} | {100 * (loss / reference - 1):+.1f} % "
                f"| {ratios[precision]:.2f} |",
                flush=True,
            )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
