"""Bit-exact resume: a run stopped half way (SIGINT) and resumed by a *new process* equals the run
that was never stopped — adapters, optimizer state and every logged loss, for every precision."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adamw_lm import resuming, trainer
from adamw_lm.codecs import PRECISIONS
from adamw_lm.config import load_config

ITERS = 40


def make_config(tmp_path: Path, model: Path, data: Path, run_dir: Path, **extra) -> Path:
    data_cfg = {
        "model": str(model),
        "data": str(data),
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.1},  # dropout: the RNG matters
        "batch_size": 4,
        "iters": ITERS,
        "val_batches": 2,
        "learning_rate": 3e-3,
        "lr_schedule": {"name": "cosine_decay", "warmup": 5, "arguments": [3e-3, ITERS, 1e-4]},
        "steps_per_report": 1,
        "steps_per_eval": 7,
        "max_seq_length": 64,
        "adapter_path": str(run_dir),
        "seed": 3,
        "optimizer": {"min_quantize_size": 64, "weight_decay": 0.02},
        "checkpoint": {"every": 6, "keep_last": 2},
    }
    for key, value in extra.items():
        section, _, sub = key.partition(".")
        if sub:
            data_cfg.setdefault(section, {})[sub] = value
        else:
            data_cfg[key] = value
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data_cfg, sort_keys=False))  # lr_schedule: name, warmup, arguments
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adamw_lm.cli", *args]


def logged_iteration(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["iteration"] for r in lines), default=0)


def train_interrupted(config: Path, run_dir: Path, after: int, sig: int = signal.SIGINT) -> None:
    """Start `adamw-lm train` in a subprocess and signal it once it has logged `after` iterations."""
    proc = subprocess.Popen(cli("train", str(config), "--no-progress"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while logged_iteration(run_dir) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:  # no handler runs: the run goes on from its last periodic checkpoint
        assert proc.returncode == -sig, (proc.returncode, out, err)
        return
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    assert f"adamw-lm resume {run_dir}" in err
    assert "Traceback" not in err


def stopped_at(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                       / "trainer_state.json").read_text())["iteration"]


def check_resume_matches(tmp_path, tiny_model_path, data_dir, sig=signal.SIGINT, move=False, after=8,
                         **extra):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = trainer.run(load_config(make_config(tmp_path, tiny_model_path, data_dir, ref_dir, **extra)),
                            progress=False)
    assert not reference.interrupted and len(reference.losses) == ITERS

    train_interrupted(make_config(tmp_path, tiny_model_path, data_dir, run_dir, **extra), run_dir, after,
                      sig)
    stop = stopped_at(run_dir)
    # A stop saves where it is; a kill leaves the last periodic checkpoint (every 6 iterations).
    assert (after - 6 if sig == signal.SIGKILL else after) <= stop < ITERS
    elsewhere = tmp_path
    if move:  # stopped, moved, resumed from another working folder
        elsewhere = tmp_path / "moved"
        elsewhere.mkdir()
        run_dir = run_dir.rename(elsewhere / "run")
    done = subprocess.run(cli("resume", str(run_dir), "--no-progress"), capture_output=True, text=True,
                          timeout=300, cwd=elsewhere)
    assert done.returncode == 0, done.stderr

    message = resuming.compare_runs(run_dir, ref_dir)  # raises on the first differing tensor or loss
    assert f"iteration {ITERS}" in message
    resumed = json.loads((run_dir / "checkpoints" / f"step-{ITERS:07d}" / "trainer_state.json").read_text())
    assert resumed["losses"] == reference.losses  # exact float equality, every iteration
    # The metrics log reads as the run never stopped: every report once, in order, with the same
    # losses, learning rates and token counts (the timings aside).
    def reports(folder: Path) -> list[tuple]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["train_loss"], r["learning_rate"], r["trained_tokens"])
                for r in records if "train_loss" in r]

    assert reports(run_dir) == reports(ref_dir)
    # mlx-lm's adapter_config.json too, byte for byte but for the run folder's path (its
    # adapter_path is where the run started, also after a move).
    for folder in (Path("."), Path("checkpoints") / f"step-{ITERS:07d}"):
        def config(run: Path) -> str:
            text = (run / folder / "adapter_config.json").read_text()
            for path in (run, tmp_path / "interrupted"):
                text = text.replace(str(path), "RUN")
            return text

        assert config(run_dir) == config(ref_dir), folder
    every = extra.get("steps_per_report", 1)
    assert [r[0] for r in reports(run_dir)] == sorted({*range(every, ITERS + 1, every), ITERS})
    return stop


@pytest.mark.parametrize("precision", [None, *PRECISIONS])
def test_lora_resume_is_bit_exact(precision, tmp_path, tiny_model_path, data_dir):
    check_resume_matches(tmp_path, tiny_model_path, data_dir, **{"optimizer.state_precision": precision})


@pytest.mark.parametrize("precision", [None, "int8"])
def test_full_fine_tune_resume_is_bit_exact(precision, tmp_path, tiny_model_path, data_dir):
    check_resume_matches(tmp_path, tiny_model_path, data_dir, fine_tune_type="full", learning_rate=1e-3,
                         **{"optimizer.state_precision": precision})


def test_resume_after_sigterm_and_move_with_accumulation_and_grad_checkpoint(tmp_path, tiny_model_path,
                                                                              data_dir):
    check_resume_matches(tmp_path, tiny_model_path, data_dir, sig=signal.SIGTERM, move=True,
                         grad_accumulation_steps=2, grad_checkpoint=True, fine_tune_type="dora",
                         **{"optimizer.state_precision": "bf16"})


def test_resume_after_sigkill_between_checkpoints_is_bit_exact(tmp_path, tiny_model_path, data_dir):
    # Killed with iterations done since the last checkpoint (and maybe a save under way): they
    # are done again, with the same batches, dropout and rounding, and logged once.
    # Reports every 5: the checkpoint it resumes from (12) falls between two (10 and 15), whose
    # token count must hold the tokens of 11 and 12.
    check_resume_matches(tmp_path, tiny_model_path, data_dir, sig=signal.SIGKILL, after=15,
                         steps_per_report=5, **{"optimizer.state_precision": "int8"})


def test_resume_refuses_overrides_that_change_the_run(tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    config = load_config(make_config(tmp_path, tiny_model_path, data_dir, run_dir), {"iters": 6})
    trainer.run(config, progress=False)
    done = subprocess.run(cli("resume", str(run_dir), "--batch-size", "8"), capture_output=True, text=True)
    assert done.returncode == 2 and "--batch_size cannot change on resume" in done.stderr
    done = subprocess.run(cli("resume", str(run_dir), "--iters", "9", "--no-progress"), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert stopped_at(run_dir) == 9


def test_resume_on_folder_without_checkpoint_is_a_clear_error(tmp_path):
    done = subprocess.run(cli("resume", str(tmp_path)), capture_output=True, text=True)
    assert done.returncode == 2
    assert "no complete checkpoint" in done.stderr and str(tmp_path) in done.stderr
    assert "Traceback" not in done.stderr

