"""The trainer's own behaviour: the run-folder lock, safe writes, the data position, reports, resume
choices, test-only mode, and its messages for bad input."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.tuner.trainer import iterate_batches

from adamw_lm import reports, resuming, trainer
from adamw_lm.config import ConfigError, from_dict
from adamw_lm.fingerprint import fingerprint


def base(model: Path, data: Path, run_dir: Path, **extra) -> dict:
    cfg = {
        "model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "batch_size": 4, "iters": 4,
        "val_batches": 1, "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 100,
        "max_seq_length": 64, "adapter_path": str(run_dir), "save_every": 2,
    }
    cfg.update(extra)
    return cfg


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamw_lm.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, **(env or {})})


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("adamw-lm")]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- one writer per run folder ------------------------------------------------------------------


def test_second_writer_is_refused_and_the_lock_dies_with_its_process(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, run_dir, iters=100000,
                                                  checkpoint={"every": 2, "keep_last": None}))
    first = subprocess.Popen([sys.executable, "-m", "adamw_lm.cli", "train", str(config), "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        tic = time.perf_counter()
        second = cli("train", str(config), "--overwrite", "--no-progress")
        assert_one_line_error(second, str(run_dir), f"pid {first.pid}", "train", str(config))
        resumed = cli("resume", str(run_dir), "--no-progress")
        assert_one_line_error(resumed, f"pid {first.pid}")
        assert "Resuming" not in resumed.stderr  # refused before choosing a checkpoint
        inspected = cli("inspect", str(run_dir))  # a reader never waits for the writer
        assert inspected.returncode == 0, inspected.stderr
        assert time.perf_counter() - tic < 60
        assert first.poll() is None  # the first writer was not disturbed
    finally:
        first.kill()  # SIGKILL: no clean-up runs, yet the kernel drops the lock
        first.wait()
    again = cli("resume", str(run_dir), "--iters", str(json.loads(
        (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
         / "trainer_state.json").read_text())["iteration"] + 2), "--no-progress")
    assert again.returncode == 0, again.stderr


def test_run_lock_is_reentrant_in_its_process_and_exclusive_across_processes(tmp_path):
    from adamw_lm.runlock import RunLock

    probe = ("import sys; from adamw_lm.runlock import RunLock, RunFolderBusyError\n"
             "try:\n    RunLock(sys.argv[1]).acquire(); print('acquired')\n"
             "except RunFolderBusyError as e:\n    print('busy:', e)")

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], capture_output=True,
                              text=True, timeout=60).stdout

    with RunLock(tmp_path / "run"):
        with RunLock(tmp_path / "run"):  # resume locks, then run locks again
            assert other_process().startswith(f"busy: run folder {tmp_path / 'run'} is in use by another "
                                              f"process (pid {os.getpid()}: ")
        assert other_process().startswith("busy:")  # the outer holder still holds it
    assert other_process() == "acquired\n"


# -- writes stay inside the run folder ------------------------------------------------------------


def test_links_at_the_names_the_trainer_writes_are_replaced_not_followed(tmp_path, tiny_model_path, data_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names = ["adapters.safetensors", "adapter_config.json", "loss.png", "0000002_adapters.safetensors",
             "0000004_adapters.safetensors"]
    for name in names:
        (run_dir / name).symlink_to(sentinel)
    result = trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    assert result.iteration == 4
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sentinel.read_text() == "precious\n"
    for name in names:
        if (run_dir / name).exists():
            assert not (run_dir / name).is_symlink(), name
    assert not (run_dir / "adapters.safetensors").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel"]


def test_a_link_at_the_lock_is_refused_and_one_at_the_metrics_log_replaced(tmp_path, tiny_model_path, data_dir):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(sentinel)
    config = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, run_dir, iters=2))
    assert_one_line_error(cli("train", str(config), "--no-progress"), ".lock")
    (run_dir / ".lock").unlink()
    # A new run starts its own log: a link planted at its name goes, its target stays as it was.
    (run_dir / "metrics.jsonl").symlink_to(sentinel)
    done = cli("train", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert not (run_dir / "metrics.jsonl").is_symlink() and sentinel.read_text() == "precious\n"


def test_appending_to_a_fifo_is_refused_at_once(tmp_path):
    from adamw_lm.runfiles import open_append

    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    tic = time.perf_counter()
    with pytest.raises(OSError, match="metrics.jsonl"):  # no reader: ENXIO at once, or not a regular file
        open_append(fifo)
    assert time.perf_counter() - tic < 5


def test_a_new_run_starts_its_own_metrics_log(tmp_path, tiny_model_path, data_dir):
    """An old run that died before its first checkpoint leaves a log behind: it is not appended to."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 99, "train_loss": 1.0}\n')
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir, iters=2)), progress=False)
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in iterations and max(iterations) == 2


def test_metrics_log_lines_from_anyone_are_read_within_limits(tmp_path):
    """metrics.jsonl is read back from the run folder (untrusted), on resume and for the plot: a
    line nested too deep, too long, torn or not an object is left out, without a traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        '{"iteration": 1, "train_loss": NaN}', "[" * 100_000 + "]" * 100_000,
        '{"iteration": 2, "x": [' + "0, " * 30_000 + "0]}", '{"iteration": 3, "tr', "[1, 2]",
        '{"iteration": 4, "train_loss": 2.0}', '{"iteration": 9, "train_loss": 1.0}',
    ]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert reports.logged(run_dir, "train_loss", 4) and not reports.logged(run_dir, "x", 2)
    reports.truncate_metrics(run_dir, 5)
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == [lines[0], lines[5]]


def test_resume_refuses_a_metrics_log_that_is_a_link(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("precious\n")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(sentinel)
    done = cli("resume", str(run_dir), "--iters", "6", "--no-progress")
    assert_one_line_error(done, "metrics.jsonl", "link")
    assert sentinel.read_text() == "precious\n"


# -- bad input: one clear line, nothing left behind -------------------------------------------------


def test_lora_key_that_matches_no_layer_names_the_key_and_leaves_nothing(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    cfg = base(tiny_model_path, data_dir, run_dir,
               lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_prj"]})
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", cfg)))
    assert_one_line_error(done, "lora_parameters.keys", "self_attn.q_prj", "matches no layer")
    assert not run_dir.exists()  # a failed set-up leaves no run folder, so no metrics.jsonl either


def test_setup_failure_in_an_existing_folder_leaves_no_metrics_log(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = base(tiny_model_path, data_dir, run_dir, num_layers=99)
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", cfg)))
    assert_one_line_error(done, "num_layers")
    assert not (run_dir / "metrics.jsonl").exists()
    ok = cli("train", str(write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, run_dir))),
             "--no-progress")
    assert ok.returncode == 0, ok.stderr
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iterations[0] == 0 and iterations == sorted(iterations)


def test_adapter_path_that_is_a_file(tmp_path, tiny_model_path, data_dir):
    (tmp_path / "taken").write_text("x")
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "taken"))))
    assert_one_line_error(done, "adapter_path", "is not a folder")
    assert "Errno" not in done.stderr


def test_relative_paths_that_do_not_exist_say_so(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base("runs/models/missing", data_dir, tmp_path / "run"))
    done = cli("train", str(cfg), cwd=tmp_path)
    assert_one_line_error(done, "'model'", "runs/models/missing does not exist")
    assert "Hub" not in done.stderr
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, "my/data/missing", tmp_path / "run"))
    done = cli("train", str(cfg), cwd=tmp_path)
    assert_one_line_error(done, "'data'", "my/data/missing does not exist")
    assert "Hugging Face" not in done.stderr
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, "data/missing", tmp_path / "run"))
    done = cli("train", str(cfg), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(done, "'data'", "data/missing does not exist as a local folder", "Hugging Face")


def test_an_org_name_id_that_is_no_folder_mentions_the_hub(tmp_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base("nobody-here/no-model", data_dir, tmp_path / "run"))
    done = cli("train", str(cfg), cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(done, "'model'", "nobody-here/no-model does not exist as a local path",
                          str(tmp_path / "nobody-here" / "no-model"), "Hugging Face Hub repo id")


def test_hf_dataset_errors_do_not_blame_the_local_data_folder(tmp_path, tiny_model_path, data_dir):
    cfg = base(tiny_model_path, data_dir, tmp_path / "run", hf_dataset={"path": "nobody/data"})
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", cfg)), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(done, "'hf_dataset'")
    assert "'data'" not in done.stderr and str(data_dir) not in done.stderr


# -- the data position ----------------------------------------------------------------------------


class CountingDataset(CacheDataset):
    """A CacheDataset that counts the examples read (tokenised) through it."""

    def __init__(self, data):
        super().__init__(data)
        self.reads = 0

    def __getitem__(self, idx):
        self.reads += 1
        return super().__getitem__(idx)


@pytest.fixture(scope="module")
def train_data(tiny_model_path, data_dir):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model_path))
    config = from_dict(base(tiny_model_path, data_dir, Path("unused")))
    return config, trainer.load_data(config, tokenizer)[0]._data


def batches_of(iterator, n):
    return [tuple(np.array(a).tolist() for a in next(iterator)) for _ in range(n)]


def test_batch_stream_is_mlx_lm_iterate_batches_epoch_by_epoch(train_data):
    config, data = train_data
    config = dataclasses.replace(config, seed=7)
    stream = trainer.BatchStream(CacheDataset(data), config)
    per_epoch = stream.batches_per_epoch
    assert per_epoch == len(data) // config.batch_size
    for epoch in (0, 1):
        expected = batches_of(iterate_batches(CacheDataset(data), config.batch_size, config.max_seq_length,
                                              seed=config.seed + epoch), per_epoch)
        assert batches_of(stream, per_epoch) == expected
    assert stream.position() == {"epoch": 1, "offset": per_epoch}


def test_batch_stream_restores_a_position_without_walking_to_it(train_data):
    config, data = train_data
    reference = trainer.BatchStream(CacheDataset(data), config)
    per_epoch = reference.batches_per_epoch
    batches_of(reference, per_epoch + 5)
    counting = CountingDataset(data)
    restored = trainer.BatchStream(counting, config, epoch=1, offset=5)
    assert counting.reads == 0  # nothing before the position was read
    assert batches_of(restored, 3) == batches_of(reference, 3)
    assert counting.reads == 3 * config.batch_size


@pytest.mark.parametrize("epoch, offset", [(0, 10**12), (-1, 0), (0, -3)])
def test_batch_stream_refuses_an_absurd_position(train_data, epoch, offset):
    config, data = train_data
    with pytest.raises(ConfigError, match="batches per epoch"):
        trainer.BatchStream(CacheDataset(data), config, epoch=epoch, offset=offset)


# -- reports --------------------------------------------------------------------------------------


def test_header_warning_and_report_lines(tmp_path, tiny_model_path, data_dir):
    cfg = base(tiny_model_path, data_dir, tmp_path / "run", steps_per_eval=2,
               optimizer={"state_precision": "int8", "min_quantize_size": 4096})
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-progress")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"Model: {tiny_model_path}" in out
    assert "Trainable parameters: " in out and "M/" in out
    plan = [line for line in out.splitlines() if line.startswith("  model.layers.*.")]
    assert len(plan) == 14 and all(" fp32 " in line and " x2 " in line for line in plan)
    assert "warning: state precision int8 applies to no tensor" in out and "min_quantize_size=4096" in out
    for it in (1, 2, 3, 4):
        assert f"Iter {it}: Train loss " in out
    assert "Iter 0: Val loss" in out and "Iter 2: Val loss" in out and "Iter 4: Val loss" in out
    line = next(line for line in out.splitlines() if line.startswith("Iter 2: Train loss"))
    for field in ("Learning Rate", "It/sec", "Tokens/sec", "Peak mem", "GB"):
        assert field in line
    assert "\r" not in out + done.stderr  # no bar with --no-progress


def test_report_lines_stay_above_the_progress_bar(tmp_path, tiny_model_path, data_dir):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from adamw_lm.cli import main; sys.exit(main(sys.argv[1:]))",
         "train", str(write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run")))],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # Report lines are whole lines of their own on stdout; the bar lives on stderr.
    assert [line for line in result.stdout.splitlines() if line.startswith("Iter ") and "Train loss" in line]
    assert "it/s" in result.stderr or "it]" in result.stderr


def test_metrics_log_is_a_callback_of_the_loop(tmp_path, tiny_model_path, data_dir):
    seen = []

    class Spy(trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            seen.append(("train", info["iteration"], info["train_loss"]))

        def on_val_loss_report(self, info):
            seen.append(("val", info["iteration"], info["val_loss"]))

    run_dir = tmp_path / "run"
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False, callback=Spy())
    logged = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        logged.append(("train", r["iteration"], r["train_loss"]) if "train_loss" in r
                      else ("val", r["iteration"], r["val_loss"]))
    assert logged == seen and len(seen) == 6


def test_gradient_checkpointing_stays_with_its_run(tmp_path, tiny_model_path, data_dir):
    """mlx-lm's grad_checkpoint patches a class; a later run in the process must not inherit it
    (with LoRA dropout, a checkpointed block draws its random numbers twice)."""
    dropout = {"lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1}, "save_every": 4}
    runs = {name: tmp_path / name for name in ("before", "checkpointed", "after")}
    for name, run_dir in runs.items():
        trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir, **dropout,
                                   grad_checkpoint=name == "checkpointed")), progress=False)
    assert "agree bit for bit" in resuming.compare_runs(runs["before"], runs["after"])
    # The checkpointed run itself is another computation, not a copy of the others: its backward
    # pass draws the dropout masks again. Without dropout, checkpointing changes nothing.
    with pytest.raises(AssertionError):
        resuming.compare_runs(runs["before"], runs["checkpointed"])
    for checkpointed in (False, True):
        run_dir = tmp_path / f"no-dropout-{checkpointed}"
        trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir, save_every=4,
                                   grad_checkpoint=checkpointed)), progress=False)
    assert "agree bit for bit" in resuming.compare_runs(tmp_path / "no-dropout-False",
                                                       tmp_path / "no-dropout-True")


def test_importing_the_trainer_does_not_import_matplotlib():
    """The plot's imports are paid at the end of a run only."""
    code = "import sys, adamw_lm.trainer, adamw_lm.cli; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# -- resume -------------------------------------------------------------------------------------


def train_reports(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["train_loss"] for r in records if "train_loss" in r}


class StopAt(trainer.TrainingCallback):
    """Ctrl-C from inside the run, at the validation of ``iteration``."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_val_loss_report(self, info):
        if info["iteration"] == self.iteration:
            os.kill(os.getpid(), signal.SIGINT)


def test_first_report_after_resume_averages_the_same_window(tmp_path, tiny_model_path, data_dir):
    common = dict(iters=10, steps_per_report=4, steps_per_eval=3, checkpoint={"every": 100},
                  lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.1})
    trainer.run(from_dict(base(tiny_model_path, data_dir, tmp_path / "a", **common)), progress=False)
    stopped = trainer.run(from_dict(base(tiny_model_path, data_dir, tmp_path / "b", **common)),
                          progress=False, callback=StopAt(6))
    assert stopped.interrupted and stopped.iteration == 6  # mid-window: reports fall on 4 and 8
    resuming.resume(tmp_path / "b", progress=False)
    uninterrupted, resumed = train_reports(tmp_path / "a"), train_reports(tmp_path / "b")
    assert sorted(uninterrupted) == sorted(resumed) == [4, 8, 10]
    assert resumed == uninterrupted  # exact, the report at 8 included
    resuming.compare_runs(tmp_path / "a", tmp_path / "b")


def test_resume_from_a_chosen_step(tmp_path, tiny_model_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    cfg = base(tiny_model_path, data_dir, run_dir, iters=8, checkpoint={"every": 2, "keep_last": None})
    first = trainer.run(from_dict(cfg), progress=False)
    final = mx.load(str(first.checkpoint / "adapters.safetensors"))
    capsys.readouterr()
    again = resuming.resume(run_dir, step=4, progress=False)
    err = capsys.readouterr().err
    assert "from iteration 4" in err and "step-0000006, step-0000008" in err and "kept" in err
    assert again.iteration == 8 and again.summary().startswith("Done: iteration 8; checkpoint ")
    redone = mx.load(str(again.checkpoint / "adapters.safetensors"))
    assert all(mx.array_equal(final[k], redone[k]).item() for k in final)
    assert sorted(train_reports(run_dir)) == list(range(1, 9))  # the log reads as one run
    with pytest.raises(trainer.checkpoint.NoCheckpointError, match="no checkpoint at step 5"):
        resuming.resume(run_dir, step=5, progress=False)


def test_resume_inside_a_gradient_accumulation_is_refused(tmp_path, tiny_model_path, data_dir):
    """A run that ended mid-accumulation dropped its partial gradient (as mlx_lm lora does): going on
    from there would not be the uninterrupted run, so it is refused with the way out."""
    run_dir = tmp_path / "run"
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir, iters=3, grad_accumulation_steps=2)),
                progress=False)
    assert_one_line_error(cli("resume", str(run_dir), "--iters", "6"), "iteration 3",
                          "gradient accumulation of 2 steps", "--step N")


def test_an_impossible_memory_budget_is_one_line(tmp_path, tiny_model_path, data_dir):
    cfg = write_yaml(tmp_path / "c.yaml", base(tiny_model_path, data_dir, tmp_path / "run"))
    done = cli("train", str(cfg), "--optimizer.state_precision", "auto", "--optimizer.memory_budget", "100")
    assert_one_line_error(done, "config section 'optimizer'", "memory_budget=100")


def test_an_override_that_decides_nothing_is_warned_about(tmp_path, tiny_model_path, data_dir):
    cfg = base(tiny_model_path, data_dir, tmp_path / "run", iters=1,
               optimizer={"overrides": {"no_such_tensor": "int8", "lora_a": "bf16"}})
    done = cli("train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "pattern 'no_such_tensor' (int8) decides no trainable tensor's precision" in done.stdout
    assert "'lora_a'" not in done.stdout


def test_resume_of_a_finished_run_and_iters_below_the_step(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    done = cli("resume", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stderr and "checkpoint None" not in done.stdout + done.stderr
    done = cli("resume", str(run_dir), "--iters", "2")
    assert_one_line_error(done, "--iters 2", "iteration 4")


def _rehash(folder: Path, name: str) -> None:
    """Make the manifest match a tampered file again, as an attacker controlling it would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_saved_config_cannot_run_code_or_send_data_on_resume(tmp_path, tiny_model_path, data_dir):
    evil_model = tmp_path / "evil_model"
    shutil.copytree(tiny_model_path, evil_model)
    sentinel = tmp_path / "sentinel"
    (evil_model / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\nfrom mlx_lm.models.llama import Model, ModelArgs\n")
    model_config = json.loads((evil_model / "config.json").read_text())
    (evil_model / "config.json").write_text(json.dumps({**model_config, "model_file": "evil.py"}))

    run_dir = tmp_path / "run"
    first = trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    state_path = first.checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["config"].update(model=str(evil_model), trust_remote_code=True, report_to="wandb")
    state["fingerprints"]["model"] = fingerprint(evil_model)  # whoever wrote the checkpoint can do this
    state_path.write_text(json.dumps(state))
    _rehash(first.checkpoint, "trainer_state.json")

    done = cli("resume", str(run_dir), "--iters", "6", "--no-progress")
    assert not sentinel.exists()
    assert "trust_remote_code (--trust-remote-code)" in done.stderr
    assert "report_to (--report-to NAME)" in done.stderr
    assert_one_line_error(done, "'model'", "trust_remote_code")  # mlx-lm refuses the custom code

    # The flag given again is what enables it: the sentinel shows the test can see code run.
    resuming.resume(run_dir, overrides={"iters": 6, "trust_remote_code": True}, progress=False)
    assert sentinel.read_text() == "ran"


def test_saved_train_false_does_not_turn_resume_into_an_evaluation_elsewhere(tmp_path, tiny_model_path,
                                                                            data_dir):
    """``train: false`` in a checkpoint's config (anyone can write one) would have resume evaluate
    the adapters of the saved ``adapter_path``, outside the run folder: resume trains this run."""
    elsewhere = tmp_path / "someone_elses_adapters"
    trainer.run(from_dict(base(tiny_model_path, data_dir, elsewhere)), progress=False)
    run_dir = tmp_path / "run"
    first = trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    state_path = first.checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["config"].update(train=False, test=True, adapter_path=str(elsewhere))
    state_path.write_text(json.dumps(state))
    _rehash(first.checkpoint, "trainer_state.json")

    done = cli("resume", str(run_dir), "--iters", "6", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert str(elsewhere) not in done.stdout + done.stderr
    assert "Resuming" in done.stderr and (run_dir / "checkpoints" / "step-0000006").is_dir()

@pytest.mark.parametrize("change", [
    {"x\x1b[2J\x1b]0;owned\x07\nadamw-lm resume: all checkpoints verified": 1},  # a forged line
    {"fine_tune_type": "A" * 100_000},
    {"model": "/nope\x1b[2K\nadamw-lm resume: OK"},
])
def test_a_saved_config_cannot_write_to_the_terminal(tmp_path, tiny_model_path, data_dir, change):
    """What a checkpoint's config holds reaches the terminal only escaped and cut short."""
    run_dir = tmp_path / "run"
    first = trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    state_path = first.checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["config"].update(change)
    state_path.write_text(json.dumps(state))
    _rehash(first.checkpoint, "trainer_state.json")

    done = cli("resume", str(run_dir), "--iters", "6", "--no-progress")
    assert_one_line_error(done)
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert len(done.stderr) < 3000, len(done.stderr)

def test_links_planted_where_a_resume_writes_or_removes_are_never_followed(tmp_path, tiny_model_path,
                                                                        data_dir):
    """A resume points latest at its checkpoint and drops mlx-lm adapters past it: a link planted
    at either name is replaced or removed itself, and what it points at stays as it was."""
    run_dir = tmp_path / "run"
    trainer.run(from_dict(base(tiny_model_path, data_dir, run_dir)), progress=False)
    target = tmp_path / "target"
    target.write_text("keep")
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(target)
    planted = run_dir / "0000009_adapters.safetensors"
    planted.symlink_to(target)

    resuming.resume(run_dir, overrides={"iters": 6}, progress=False)
    assert target.read_text() == "keep"
    assert not latest.is_symlink() and latest.read_text() == "step-0000006\n"
    assert not planted.is_symlink() and not planted.exists()

def test_plain_local_resume_needs_no_flags_and_keeps_hf_dataset_only_on_request(tmp_path, tiny_model_path,
                                                                                data_dir):
    data = {"model": str(tiny_model_path), "hf_dataset": {"path": "x"}, "report_to": None,
            "trust_remote_code": False}
    assert resuming._consent(dict(data), {}) == ["hf_dataset (--hf-dataset)"]
    kept = dict(data)
    assert resuming._consent(kept, {"hf_dataset": True}) == [] and kept["hf_dataset"] == {"path": "x"}
    with pytest.raises(ConfigError, match="--hf-dataset"):
        resuming._consent(dict(data), {"hf_dataset": {"path": "y"}})


# -- test-only mode -------------------------------------------------------------------------------


def test_test_only_mode_matches_mlx_lm_lora(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    config = from_dict(base(tiny_model_path, data_dir, run_dir))
    trainer.run(config, progress=False)
    result = trainer.run(dataclasses.replace(config, train=False, test=True, test_batches=3), progress=False)
    assert result.test_loss is not None and result.checkpoint is None
    assert result.summary() == f"Test loss {result.test_loss:.3f} of the adapters in {run_dir}"
    test_only = write_yaml(tmp_path / "t.yaml", base(tiny_model_path, data_dir, run_dir, train=False, test=True,
                                                     test_batches=3))
    done = cli("train", str(test_only), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert result.summary() in done.stdout and "checkpoint None" not in done.stdout
    reference = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model_path), "--data", str(data_dir),
         "--test", "--adapter-path", str(run_dir), "--batch-size", "4", "--test-batches", "3",
         "--max-seq-length", "64"],
        capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    assert f"Test loss {result.test_loss:.3f}," in reference.stdout


def test_test_only_mode_without_adapters_is_a_clear_error(tmp_path, tiny_model_path, data_dir):
    config = from_dict(base(tiny_model_path, data_dir, tmp_path / "none"))
    with pytest.raises(ConfigError, match="adapter_path.*does not exist"):
        trainer.run(dataclasses.replace(config, train=False, test=True), progress=False)


def test_run_folder_holds_the_latest_adapters_after_an_interrupt(tmp_path, tiny_model_path, data_dir):
    """As after a Ctrl-C: `mlx_lm generate --adapter-path RUN` finds the last checkpoint's adapters."""
    from mlx_lm import load
    from mlx.utils import tree_flatten

    run_dir = tmp_path / "run"
    cfg = base(tiny_model_path, data_dir, run_dir, iters=20, steps_per_eval=3, save_every=100,
               checkpoint={"every": 2})
    stopped = trainer.run(from_dict(cfg), progress=False, callback=StopAt(3))
    assert stopped.interrupted and stopped.iteration == 3
    model, _ = load(str(tiny_model_path), adapter_path=str(run_dir))
    saved = mx.load(str(stopped.checkpoint / "adapters.safetensors"))
    loaded = dict(tree_flatten(model.parameters()))
    assert saved and all(mx.array_equal(loaded[k], v).item() for k, v in saved.items())
    assert not list(run_dir.glob("*_adapters.safetensors"))  # save_every not reached


def test_loss_plot_draws_only_well_formed_points(tmp_path):
    """metrics.jsonl is read back from the run folder: lines that are not records of finite
    numbers are left out, and a log with nothing to draw gives no plot."""
    from adamw_lm.reports import METRICS_FILE, plot  # matplotlib: scripts/test.sh installs it

    log = tmp_path / METRICS_FILE
    log.write_text('"train_loss"\n{"train_loss": 1}\n{"iteration": 1, "train_loss": "x"}\n[1]\n')
    assert plot(tmp_path) is None and not (tmp_path / "loss.png").exists()
    log.write_text(log.read_text() + '{"iteration": 2, "train_loss": 3.5}\n'
                   '{"iteration": 2, "val_loss": NaN}\nnot json\n')
    assert plot(tmp_path) == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
