"""Low-precision moments converge like float32 moments on small deterministic problems.

The problems and the training loop are those of ``scripts/bench_convergence.py``: 300 full-batch
AdamW steps, cosine schedule 1e-2 -> 1e-4, every tensor quantized. The final loss of each state
precision is held within the issue's targets of the float32-moment run's: bf16 1 %, int8 2 %,
int4 10 %. Round-to-nearest codes stalled (int4 +815 %, +589 %, +91 %, int8 +3.6 % on least
squares); stochastic rounding with fresh random bits left int4 at +17.1 %, +12.6 % and +12.8 %
(least squares, cond 1e4, MLP), which the rotating noise of int4's first moment removed on the
convex problems (docs/benchmarks.md).

The MLP, a non-convex fit, is held under int8 and int4 by its median over five draws (bf16 on
draw 0): its final loss under quantized moments depends on the rounding pattern (int4 on draw 0,
with session 4's random bits: +0.9 % to +12.4 % over six patterns of the first moment's phases),
while float32 moments with the learning rate moved by 0.1 % move it by 0.1 %; one draw (1) swings
much further (int4 +63 %). One run is a sample of the effect, not the effect. int4 met its 10 %
target there only once its first moment was stored as its step, ``m / (sqrt(v) + eps)`` (median
+4.9 %; before, +15.9 %, held to 20 %); that costs noise-free least squares a few percent (draw 0
+1.4 %, up to +9.9 % over ten draws, against up to +2.3 % before), within its bound.
"""

import math
import os
import statistics
import sys
from pathlib import Path

import pytest

# Imported by name, not from a file spec: the MLP's draws run in spawned processes, which find
# the script's functions by module name.
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import bench_convergence as bench  # noqa: E402

BOUNDS = {"bf16": 0.01, "int8": 0.02, "int4": 0.10}
#: On the MLP, by the median of its draws (see the module docstring); bf16 moments do not move
#: its final loss beyond their bound on any draw, so they are held on draw 0 like the others.
MLP_BOUNDS = {"int8": 0.02, "int4": 0.10}
MLP_DRAWS = 5
SINGLE_DRAW = [
    (problem, precision)
    for problem in bench.PROBLEMS
    for precision in BOUNDS
    if not (problem == "MLP" and precision in MLP_BOUNDS)
]


#: Processes running the problems side by side (each run is single-threaded and deterministic:
#: the same losses as one after the other, in half the time on two cores).
JOBS = min(2, os.cpu_count() or 1)


@pytest.fixture(scope="session")
def losses() -> dict[tuple[str, int, str], float]:
    """Final loss of each ``(problem, draw, precision)`` the tests hold: draw 0 of every problem
    and the MLP's draws, under float32 moments and each bounded precision."""
    cases = [(problem, 0, precision) for problem, precision in SINGLE_DRAW]
    cases += [(problem, 0, "fp32") for problem in bench.PROBLEMS if problem != "MLP"]
    cases += [("MLP", d, p) for p in ["fp32", *MLP_BOUNDS] for d in range(MLP_DRAWS)]
    return dict(zip(cases, bench.final_losses(cases, jobs=JOBS)))


@pytest.mark.parametrize(("problem", "precision"), SINGLE_DRAW)
def test_final_loss_is_near_float32_moments(problem, precision, losses):
    reference = losses[problem, 0, "fp32"]
    params, loss = bench.PROBLEMS[problem]()
    assert loss(params).item() > 5 * reference  # the problem is learned, not started solved
    ours = losses[problem, 0, precision]
    assert math.isfinite(ours)
    bound = BOUNDS[precision]
    assert ours <= reference * (1 + bound), f"{ours / reference - 1:+.1%} over float32 moments"


@pytest.mark.parametrize("precision", list(MLP_BOUNDS))
def test_mlp_median_final_loss_is_near_float32_moments(precision, losses):
    references = [losses["MLP", d, "fp32"] for d in range(MLP_DRAWS)]
    for draw, reference in enumerate(references):
        params, loss = bench.DRAWS["MLP"](draw)
        assert loss(params).item() > 5 * reference
    excess = [losses["MLP", d, precision] / references[d] - 1 for d in range(MLP_DRAWS)]
    assert all(math.isfinite(e) for e in excess)
    assert statistics.median(excess) <= MLP_BOUNDS[precision], [f"{e:+.1%}" for e in excess]
