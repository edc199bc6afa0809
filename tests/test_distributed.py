"""Data-parallel runs under ``mlx.launch`` (ring backend, local processes): the same run as one
process, ZeRO-1 sharding that changes no bit, sharded checkpoints resumed at other world sizes, and a
process killed mid-save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from adamw_lm import checkpoint, resuming, trainer
from adamw_lm.config import load_config

ITERS = 8
#: Reductions over 2 processes add in another order than one process: float32 noise, grown a little
#: by 8 Adam steps.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 2e-4
LAUNCH_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def equal_length_data(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Examples of exactly 24 tokens: mlx-lm's data-parallel loss is the mean of the processes'
    mean losses, which is the one-process loss only when every process sees as many tokens."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "sea", "one", "two", "big", "old"]
    texts: list[str] = []
    while len(texts) < 72:
        text = " ".join(rng.choice(words, int(rng.integers(6, 14))))
        if len(tokenizer.encode(text)) == 24:
            texts.append(text)
    folder = tmp_path_factory.mktemp("equal_data")
    for name, part in (("train", texts[:48]), ("valid", texts[48:60]), ("test", texts[60:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return folder


def write_config(tmp_path: Path, model: Path, data: Path, run_dir: Path, **optimizer) -> Path:
    config = {
        "model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "batch_size": 6, "iters": ITERS,
        "val_batches": 2, "steps_per_eval": 4, "learning_rate": 3e-3, "steps_per_report": 1,
        "max_seq_length": 64, "adapter_path": str(run_dir), "seed": 3,
        # fp32 moments round deterministically: two processes add gradients in another order than one,
        # and stochastic rounding would turn that float noise into other rounding draws.
        "optimizer": {"min_quantize_size": 64, "state_precision": "fp32", **optimizer},
        "checkpoint": {"every": 4, "keep_last": 3},
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(n: int, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """``mlx.launch -n N --backend ring`` of ``adamw-lm ARGS`` (or of ``script``), this checkout first."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    target = [str(script)] if script else ["-m", "adamw_lm.cli", *args, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([str(launcher), "-n", str(n), "--backend", "ring", "--python", sys.executable,
                           *target], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


def launch_ok(n: int, *args: str) -> None:
    done = launch(n, *args)
    assert done.returncode == 0, done.stderr[-3000:]


def adapters(run_dir: Path, step: int = ITERS) -> dict[str, mx.array]:
    return mx.load(str(run_dir / "checkpoints" / f"step-{step:07d}" / "adapters.safetensors"))


def losses(run_dir: Path, step: int = ITERS) -> list[float]:
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    return json.loads((folder / "trainer_state.json").read_text())["losses"]


def shard_arrays(run_dir: Path, step: int = ITERS) -> list[dict[str, mx.array]]:
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    manifest = json.loads((folder / "manifest.json").read_text())
    return [mx.load(str(folder / s["file"])) for s in sorted(manifest["optimizer_shards"], key=lambda s: s["rank"])]


def assert_close(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert a.keys() == b.keys()
    worst = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="session")
def runs(tiny_model_path: Path, equal_length_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process; two processes unsharded; two processes sharded (ZeRO-1)."""
    tmp = tmp_path_factory.mktemp("dist_runs")
    dirs = {name: tmp / name for name in ("one", "two", "two_sharded")}
    trainer.run(load_config(write_config(tmp, tiny_model_path, equal_length_data, dirs["one"])), progress=False)
    launch_ok(2, "train", str(write_config(tmp, tiny_model_path, equal_length_data, dirs["two"])))
    launch_ok(2, "train", str(write_config(tmp, tiny_model_path, equal_length_data, dirs["two_sharded"],
                                           shard_state=True)))
    return {"tmp": tmp, **dirs}


def test_two_processes_train_the_run_of_one_with_the_same_global_batch(runs):
    np.testing.assert_allclose(losses(runs["two"]), losses(runs["one"]), rtol=LOSS_RTOL)
    assert_close(adapters(runs["two"]), adapters(runs["one"]))
    # Evaluation split over the processes and summed: the validation losses of one process.
    states = [json.loads((runs[r] / "checkpoints" / f"step-{ITERS:07d}" / "trainer_state.json").read_text())
              for r in ("one", "two")]
    assert [it for it, _ in states[1]["val_losses"]] == [it for it, _ in states[0]["val_losses"]] == [0, 4, 8]
    np.testing.assert_allclose([v for _, v in states[1]["val_losses"]], [v for _, v in states[0]["val_losses"]],
                               rtol=LOSS_RTOL)
    assert states[1]["trained_tokens"] == states[0]["trained_tokens"]  # summed over the processes
    # Rank 0 alone writes the metrics: as many records as one process writes.
    records = [(runs[r] / "metrics.jsonl").read_text().splitlines() for r in ("one", "two")]
    assert len(records[1]) == len(records[0])
    # Only rank 0 wrote the unsharded checkpoint: one whole optimizer file.
    assert [len(s) for s in shard_arrays(runs["two"])] == [len(mx.load(str(
        runs["one"] / "checkpoints" / f"step-{ITERS:07d}" / "optimizer.safetensors")))]


def test_sharded_state_is_bit_identical_and_half_per_process(runs):
    # Adapters, every logged loss and the whole (merged) fp32 optimizer state, bit for bit.
    assert resuming.compare_runs(runs["two"], runs["two_sharded"]).startswith("MATCH")
    (whole,) = shard_arrays(runs["two"])
    shards = shard_arrays(runs["two_sharded"])
    moments = [sum(v.nbytes for k, v in s.items() if "." in k) for s in (whole, *shards)]
    assert moments[1] + moments[2] == moments[0]
    assert abs(moments[1] - moments[0] / 2) <= 0.1 * moments[0], moments


@pytest.mark.parametrize("source, world", [("two_sharded", 1), ("two_sharded", 3), ("one", 2)])
def test_checkpoint_resumes_at_another_world_size(runs, source, world):
    """2 → 1 and 2 → 3 from a sharded checkpoint; 1 → 2 from an unsharded one, sharding it on resume."""
    import shutil

    run_dir = runs["tmp"] / f"resumed_{source}_{world}"
    shutil.copytree(runs[source], run_dir)
    if world == 1:
        assert resuming.resume(run_dir, step=4, progress=False).iteration == ITERS
    else:
        launch_ok(world, "resume", str(run_dir), "--step", "4", "--optimizer.shard_state", "true")
    np.testing.assert_allclose(losses(run_dir), losses(runs[source]), rtol=LOSS_RTOL)
    assert_close(adapters(run_dir), adapters(runs[source]))
    manifest = json.loads((run_dir / "checkpoints" / f"step-{ITERS:07d}" / "manifest.json").read_text())
    assert [s["world_size"] for s in manifest["optimizer_shards"]] == [world] * world


@pytest.mark.parametrize("fault", ["sigkill", "disk_full"])
def test_a_process_failing_mid_save_leaves_the_last_checkpoint_and_stops_the_others(fault, tmp_path,
                                                                                    tiny_model_path,
                                                                                    equal_length_data):
    run_dir = tmp_path / "failed"
    config = write_config(tmp_path, tiny_model_path, equal_length_data, run_dir, shard_state=True)
    script = tmp_path / "fail_rank1_mid_save.py"
    # Rank 1 dies (SIGKILL) or finds its disk full while writing its shard of the step-8 checkpoint.
    script.write_text(textwrap.dedent(f"""
        import errno, os, signal, sys
        import mlx.core as mx
        from adamw_lm import cli
        from adamw_lm.checkpoint import writing

        original = writing._write_safetensors
        def failing(path, arrays, metadata):
            if mx.distributed.init().rank() == 1 and "step-0000008" in str(path):
                with open(path, "wb") as f:
                    f.write(b"half a shard")
                if {fault!r} == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return original(path, arrays, metadata)
        writing._write_safetensors = failing
        sys.exit(cli.main(["train", {str(config)!r}, "--no-progress"]))
    """))
    done = launch(2, script=script)  # mlx.launch itself exits 0 whatever its processes did
    if fault == "sigkill":
        assert "rank 1 exited with code -9" in done.stderr, done.stderr[-3000:]
        assert "lost the other processes" in done.stderr, done.stderr[-3000:]
    else:  # every process says so and exits 2, none is left waiting
        assert "No space left on device" in done.stderr, done.stderr[-3000:]
        assert "another process could not write its shard" in done.stderr, done.stderr[-3000:]
    assert checkpoint.latest_checkpoint(run_dir).name == "step-0000004"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert checkpoint.verify(run_dir / "checkpoints" / "step-0000004")["step"] == 4


def test_plan_per_process_divides_only_the_sharded_state(tiny_model_path, capsys):
    from adamw_lm import cli

    def table(*extra: str) -> str:
        assert cli.main(["plan", "--model", str(tiny_model_path), "--num-layers", "2", "--precision",
                         "none", *extra]) == 0
        return capsys.readouterr().out.splitlines()[4]

    whole, unsharded, sharded = table(), table("--world-size", "2"), table("--world-size", "2", "--shard-state")
    cells = [row.split("|")[3:6] for row in (whole, unsharded, sharded)]  # weights, gradients, state
    assert cells[0] == cells[1] and cells[2][:2] == cells[0][:2]
    assert float(cells[2][2].split()[0]) == pytest.approx(float(cells[0][2].split()[0]) / 2, rel=1e-3)
    assert cli.main(["plan", "--model", str(tiny_model_path), "--num-layers", "2", "--world-size", "0"]) == 2
    assert cli.main(["plan", "--model", str(tiny_model_path), "--num-layers", "2", "--world-size", "3"]) == 2
    # Each process computes its share of every batch: 4 examples over 2 processes are, per process,
    # the activations of 2 examples in one.
    common = ["--precision", "none", "int8", "--max-seq-length", "64"]
    assert table("--batch-size", "4", "--world-size", "2", *common) == table("--batch-size", "2", *common)
    assert table("--batch-size", "4", *common) != table("--batch-size", "2", *common)


def test_manifest_shard_entries_are_checked(runs, tmp_path):
    import shutil

    from adamw_lm.checkpoint import CorruptCheckpointError
    from adamw_lm.checkpoint.format import check_manifest

    folder = runs["two_sharded"] / "checkpoints" / f"step-{ITERS:07d}"
    manifest = json.loads((folder / "manifest.json").read_text())
    check_manifest(folder / "manifest.json", manifest, ITERS)
    shards = manifest["optimizer_shards"]
    broken = {
        "a rank twice": [shards[0], {**shards[1], "rank": 0}],
        "two world sizes": [shards[0], {**shards[1], "world_size": 3}],
        "a parameter in two shards": [shards[0], {**shards[1], "parameters": shards[0]["parameters"][:1]}],
        "a parameter that is no path": [shards[0], {**shards[1], "parameters": ["../../etc"]}],
        "one file for two ranks": [shards[0], {**shards[1], "file": shards[0]["file"]}],
    }
    for what, entries in broken.items():
        with pytest.raises(CorruptCheckpointError, match="optimizer_shards|optimizer shard"):
            check_manifest(folder / "manifest.json", {**manifest, "optimizer_shards": entries}, ITERS)
    # A shard whose file holds another shard's parameters is refused by the loader.
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    swapped = {**manifest, "optimizer_shards": [{**shards[0], "parameters": shards[1]["parameters"]},
                                                {**shards[1], "parameters": shards[0]["parameters"]}]}
    (copy / "manifest.json").write_text(json.dumps(swapped))
    with pytest.raises(CorruptCheckpointError, match="precision plan does not name the parameters"):
        checkpoint.verify(copy)


SHARDED_PRECISIONS_SCRIPT = '''
import json
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from adamw_lm import AdamW
from adamw_lm.sharding import ShardedOptimizer

group = mx.distributed.init()
mx.random.seed(0)
# "0", empty and first in its process's share, holds no NaN to skip with.
shapes = {"0": (0,), "a": (64, 48), "b": (300,), "c": (32, 32), "d": (17, 40), "e": (7,)}
params0 = {k: mx.random.normal(s).astype(mx.bfloat16 if k == "c" else mx.float32) for k, s in shapes.items()}
grads = [{k: mx.random.normal(s).astype(params0[k].dtype) for k, s in shapes.items()} for _ in range(4)]
# Low precisions skip a step with a NaN on every process alike, the first step too (before any
# state exists); None (mlx) takes the NaN. A tensor an override pins to None ("a", the first of
# a process's share) takes mlx's update of its own, finite, gradient while the others skip.
cases = [(precision, "", 2) for precision in (None, "fp32", "bf16", "int8", "int4")]
cases += [(precision, variant, 0) for precision in ("fp32", "bf16", "int8", "int4")
          for variant in ("@first", "@first+a:None")]
results = {}
for precision, variant, nan_step in cases:
    overrides = {"^a$": None} if "a:None" in variant else {}
    # The NaN in a tensor of the process that does not hold "0", where there is one (the shares
    # are a pure function of the state's sizes), and not in "a" when "a" takes mlx's update.
    probe = ShardedOptimizer(AdamW(1e-2, state_precision=precision, min_quantize_size=64,
                                   precision_overrides=overrides))
    probe.owned(params0)
    target = next((k for k in ("e", "d", "b", "c", "a") if probe.owners[k] != probe.owners["0"]
                   and not (k == "a" and overrides)), "e")
    steps = [dict(g) for g in grads]
    steps[nan_step][target] = steps[nan_step][target] * float("nan")
    runs = {}
    for name, exchange, seed in (("whole", None, 1), ("other_seed", None, 2), ("all_gather", "all_gather", 1),
                                 ("all_sum", "all_sum", 1)):
        optimizer = AdamW(1e-2, state_precision=precision, min_quantize_size=64, seed=seed,
                          precision_overrides=overrides)
        if exchange:
            optimizer = ShardedOptimizer(optimizer, exchange=exchange)
        params = dict(params0)
        for g in steps:
            params = optimizer.apply_gradients(g, params)
            mx.eval(params, optimizer.state)
        runs[name] = (params, optimizer.state_nbytes(), int(optimizer.state.get("skipped_steps", mx.array(0)).item()))
    whole = runs["whole"][0]
    results[str(precision) + variant] = {
        name: {"equal": all(mx.array_equal(whole[k], p[k], equal_nan=True).item() for k in whole),
               "max_diff": max((mx.abs(whole[k].astype(mx.float32) - p[k].astype(mx.float32)).max()
                                / mx.abs(whole[k].astype(mx.float32)).max()).item() for k in whole if whole[k].size),
               "state_bytes": nbytes, "skipped": skipped, "nan_in_a": mx.isnan(p["a"]).any().item()}
        for name, (p, nbytes, skipped) in runs.items()}
if group.rank() == 0:
    print("RESULT " + json.dumps(results))
'''


def test_every_state_precision_works_sharded(tmp_path):
    script = tmp_path / "sharded_precisions.py"
    script.write_text(SHARDED_PRECISIONS_SCRIPT)
    done = launch(2, script=script)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-3000:]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 13
    for precision, runs in results.items():
        whole = runs["whole"]
        # Stochastic rounding draws each parameter's bits from the step's key and its path, so a
        # process rounds its share as the whole optimizer does; another seed rounds otherwise
        # (under fp32 too: the bf16 tensor's weight is written with stochastic rounding).
        assert runs["other_seed"]["equal"] == (precision == "None"), precision
        if "a:None" in precision:  # "a" takes mlx's update of its own, finite, gradient
            assert not any(run["nan_in_a"] for run in runs.values()), precision
        for exchange in ("all_gather", "all_sum"):
            run = runs[exchange]
            assert run["equal"], (precision, exchange, run)
            assert run["skipped"] == whole["skipped"] == (0 if precision == "None" else 1)
            if "a:None" not in precision:  # else "a", with mlx's float32 moments, is 3/4 of the state
                assert 0.3 * whole["state_bytes"] < run["state_bytes"] < 0.7 * whole["state_bytes"], (precision, run)


def test_sigterm_to_one_process_stops_all_after_one_save_and_resume_is_bit_exact(runs, tmp_path,
                                                                                   tiny_model_path,
                                                                                   equal_length_data):
    run_dir = tmp_path / "stopped"
    config = write_config(tmp_path, tiny_model_path, equal_length_data, run_dir, shard_state=True)
    script = tmp_path / "sigterm_rank1.py"
    # Rank 1 alone gets SIGTERM while it reads the batch of iteration 5.
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        import mlx.core as mx
        from adamw_lm import cli
        from adamw_lm.batches import BatchStream

        original = BatchStream.__next__
        def next_batch(self):
            batch = original(self)
            if mx.distributed.init().rank() == 1 and (self.epoch, self.offset) == (0, 5):
                os.kill(os.getpid(), signal.SIGTERM)
            return batch
        BatchStream.__next__ = next_batch
        sys.exit(cli.main(["train", {str(config)!r}, "--no-progress"]))
    """))
    done = launch(2, script=script)
    assert "Stopped at iteration 5" in done.stderr, done.stderr[-3000:]
    assert checkpoint.latest_checkpoint(run_dir).name == "step-0000005"
    launch_ok(2, "resume", str(run_dir))
    assert resuming.compare_runs(run_dir, runs["two_sharded"]).startswith("MATCH")


def test_partition_is_a_balanced_pure_function_of_sizes_and_world_size():
    from adamw_lm.sharding import partition

    sizes = {f"layers.{i}.w": 1000 * (1 + i % 4) for i in range(13)} | {"norm": 8, "head": 5000}
    owners = partition(sizes, 3)
    assert partition(dict(reversed(list(sizes.items()))), 3) == owners  # not the dict's order
    loads = [sum(n for p, n in sizes.items() if owners[p] == r) for r in range(3)]
    assert sum(loads) == sum(sizes.values()) and max(loads) - min(loads) <= max(sizes.values())
    assert set(partition(sizes, 1).values()) == {0}
    with pytest.raises(ValueError, match="world_size"):
        partition(sizes, 0)


class _Examples:
    """Stand-in for a CacheDataset: (tokens, offset) pairs of a few lengths."""

    def __init__(self, n: int):
        self.items = [(list(range(100 * i, 100 * i + 5 + i % 3)), 0) for i in range(n)]

    def itemlen(self, idx: int) -> int:
        return len(self.items[idx][0])

    def __getitem__(self, idx: int):
        return self.items[idx]

    def __len__(self) -> int:
        return len(self.items)


def test_each_process_takes_its_share_of_the_same_global_batches():
    from adamw_lm.batches import BatchStream
    from adamw_lm.config import ConfigError, TrainConfig

    config = TrainConfig(batch_size=4, max_seq_length=32, seed=5)
    data = _Examples(24)

    def rows(stream: BatchStream) -> set[tuple[int, ...]]:
        batch, lengths = next(stream)
        return {tuple(batch[i, : int(lengths[i, 1])].tolist()) for i in range(batch.shape[0])}

    whole = BatchStream(data, config, epoch=1, offset=2)
    shares = [BatchStream(data, config, 1, 2, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # across the end of an epoch too
        parts = [rows(s) for s in shares]
        assert not parts[0] & parts[1] and parts[0] | parts[1] == rows(whole)
    assert [s.position() for s in shares] == [whole.position()] * 2
    with pytest.raises(ConfigError, match="'batch_size' is 4.*3 processes"):
        BatchStream(data, config, rank=0, world_size=3)


def test_shard_state_refuses_auto_precision_with_a_clear_error(tiny_model_path, data_dir, tmp_path):
    from adamw_lm.config import ConfigError, from_dict

    config = from_dict({"model": str(tiny_model_path), "data": str(data_dir), "num_layers": 2,
                        "batch_size": 2, "adapter_path": str(tmp_path / "run"),
                        "optimizer": {"shard_state": True, "state_precision": "auto", "memory_budget": 10**6}})
    with pytest.raises(ConfigError, match="optimizer.shard_state.*'auto'"):
        trainer.setup(config)
