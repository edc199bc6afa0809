"""scripts/bench_optimizer.py, small: its table, and ``--against`` timing another revision's
package side by side with this one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--hidden", "64",
         "--layers", "1", "--steps", "1", "--warmup", "0", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


def rows(table: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell."""
    found = {}
    for line in table.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            found[cells[0]] = cells[1:]
    return found


def test_against_a_revision_adds_its_rows_next_to_ours():
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    done = run("--against", "HEAD")
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    for precision, bytes_per_param in (("int8", 2.03), ("int4", 1.07)):
        ours, theirs = table[precision], table[f"{precision} @ {sha}"]
        # Same state layout at HEAD: the same bytes; a time was measured for both.
        assert ours[0] == theirs[0] and float(ours[0]) < bytes_per_param + 0.02
        assert float(ours[1]) > 0 and float(theirs[1]) > 0


def test_lora_rank_times_the_adapters_of_the_matrices():
    done = run("--lora-rank", "4")
    assert done.returncode == 0, done.stderr
    # 7 matrices of one layer, two adapters each, 4 × (64 + 64) or 4 × (64 + 176) elements.
    assert "LoRA rank 4), 14 tensors" in done.stdout
    assert "0.0M float32 parameters" in done.stdout
    assert float(rows(done.stdout)["int8"][1]) > 0


def test_bfloat16_weights_time_every_weight_update_and_two_streams():
    done = run("--weight-dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout)
    for precision in ("fp32", "bf16", "int8", "int4"):
        for mode in ("nearest", "stochastic", "exact"):
            assert float(table[f"{precision}, {mode}"][1]) > 0
        # Two streams with the default weight update, where there are two cores to spread over.
        if (os.cpu_count() or 1) > 1:
            assert float(table[f"{precision}, stochastic, 2 streams"][1]) > 0
    # exact's buffer: 2 bytes per parameter more.
    assert float(table["int8, exact"][0]) - float(table["int8, nearest"][0]) == pytest.approx(2)


def test_against_an_unknown_revision_is_one_line():
    done = run("--against", "no-such-revision")
    assert done.returncode == 2
    assert "--against no-such-revision" in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_each_optimizer_is_timed_beside_its_own_mlx_adamw():
    """time_in_phases: one phase per optimizer and its ``@`` twins, each with a fresh mlx AdamW
    interleaved step by step; ratios are taken to that phase's mlx times."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import mlx.optimizers as optim
    from bench_optimizer import MLX, gradient_like, llama_like_tree, time_in_phases

    from adamw_lm import AdamW

    weights = llama_like_tree(32, 1)
    makers = {
        MLX: lambda: optim.AdamW(1e-3),
        "int8": lambda: AdamW(1e-3, state_precision="int8"),
        "int8 @ twin": lambda: AdamW(1e-3, state_precision="int8"),
        "bf16": lambda: AdamW(1e-3, state_precision="bf16"),
    }
    timed = time_in_phases(makers, weights, gradient_like(weights), warmup=1, steps=3)
    assert sorted(timed) == ["bf16", "int8", "int8 @ twin"]
    assert all(len(t) == 3 and len(base) == 3 and min(t) > 0 for t, base in timed.values())
    # The twin shared its phase (the same mlx times); the other optimizer had a phase of its own.
    assert timed["int8"][1] is timed["int8 @ twin"][1]
    assert timed["bf16"][1] is not timed["int8"][1]
