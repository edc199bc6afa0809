"""A run killed (SIGKILL) at the moments between the writes of a save resumes into the same run:
after its last checkpoint, while a save replaces a step folder, and while a run folder's file is
being replaced. tests/helpers/kill_at.py kills the CLI at each moment exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adamw_lm import checkpoint, reports, resuming, trainer
from test_resume import cli, make_config

HELPER = Path(__file__).parent / "helpers" / "kill_at.py"
ITERS = 12  # checkpoints every 6


def killed(mode: str, arg: str, *args: str) -> None:
    """Run the CLI with ``args`` under kill_at.py; it must die at that moment."""
    proc = subprocess.run([sys.executable, str(HELPER), mode, arg, "--", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9 and "killed" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


def resumed(run_dir: Path, *args: str) -> str:
    proc = subprocess.run(cli("resume", str(run_dir), *args, "--no-progress"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_path, data_dir) -> tuple[Path, Path]:
    """A run never killed, and the folder where the configs go."""
    tmp = tmp_path_factory.mktemp("kill_points")
    config = make_config(tmp, tiny_model_path, data_dir, tmp / "reference", iters=ITERS, save_every=6)
    subprocess.run(cli("train", str(config), "--no-progress"), check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    return tmp / "reference", tmp


def config_for(reference, tiny_model_path, data_dir, name: str) -> tuple[Path, Path]:
    tmp = reference[1]
    run_dir = tmp / name
    return make_config(tmp, tiny_model_path, data_dir, run_dir, iters=ITERS, save_every=6), run_dir


def test_killed_after_its_last_checkpoint(reference, tiny_model_path, data_dir):
    """The run folder's adapters are written before the checkpoint that holds them: a run killed
    once its last checkpoint is in place is finished, with mlx-lm's files all there."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "after_last")
    killed("after-save", str(ITERS), "train", str(config))
    last = run_dir / "checkpoints" / f"step-{ITERS:07d}"
    for name in (checkpoint.ADAPTERS, f"{ITERS:07d}_adapters.safetensors"):
        assert (run_dir / name).read_bytes() == (last / checkpoint.ADAPTERS).read_bytes(), name
    assert "is finished at iteration 12" in resumed(run_dir)
    resuming.compare_runs(reference[0], run_dir)
    try:
        import matplotlib  # noqa: F401  (the plot extra)
    except ImportError:
        assert not (run_dir / "loss.png").exists()
    else:
        assert (run_dir / "loss.png").is_file()


def test_killed_before_its_test_evaluation(reference, tiny_model_path, data_dir):
    """With ``test: true`` the test set is evaluated after the last checkpoint: a run killed in
    between evaluates it on resume (once), from the same weights an uninterrupted run tests."""
    tmp = reference[1]
    whole_dir, run_dir = tmp / "tested_whole", tmp / "tested_killed"
    whole = make_config(tmp, tiny_model_path, data_dir, whole_dir, iters=ITERS, save_every=6, test=True)
    done = subprocess.run(cli("train", str(whole), "--no-progress"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    expected = [line for line in done.stdout.splitlines() if line.startswith("Test loss")]
    assert len(expected) == 1, done.stdout

    config = make_config(tmp, tiny_model_path, data_dir, run_dir, iters=ITERS, save_every=6, test=True)
    killed("after-save", str(ITERS), "train", str(config))
    assert not reports.logged(run_dir, "test_loss", ITERS)
    proc = subprocess.run(cli("resume", str(run_dir), "--no-progress"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "stopped before its test set evaluation" in proc.stderr, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("Test loss")] == expected
    assert reports.logged(run_dir, "test_loss", ITERS)
    assert f"checkpoint {run_dir / 'checkpoints' / f'step-{ITERS:07d}'}" in proc.stdout
    # Evaluated once: the next resume has nothing to do.
    assert "nothing to do" in resumed(run_dir)
    resuming.compare_runs(whole_dir, run_dir)

def test_killed_while_a_save_replaces_a_step_folder(reference, tiny_model_path, data_dir):
    """A resume from an earlier step saves over a later step's folder; killed between moving the
    old folder aside and putting the new one in place, neither is under the name. The next resume
    puts the old one back (latest names it) instead of deleting it with the leftovers."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "replace")
    subprocess.run(cli("train", str(config), "--no-progress"), check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    killed("between-renames", str(ITERS), "resume", str(run_dir), "--step", "6")
    root, name = run_dir / "checkpoints", f"step-{ITERS:07d}"
    assert not (root / name).exists()
    assert any(n.startswith(f".trash-{name}-") for n in leftovers(root)), leftovers(root)
    out = resumed(run_dir, "--iters", str(ITERS + 2))
    assert f"Put back {name}" in out and "Resuming" in out and f"from iteration {ITERS}" in out, out
    assert leftovers(root) == []
    checkpoint.verify(root / name)


def test_killed_while_replacing_a_run_folder_file(reference, tiny_model_path, data_dir):
    """A kill between writing a run folder's file (mlx-lm's numbered adapters of the last
    iteration) to a temporary and renaming it leaves the temporary; the resumed run removes it
    and ends as the run never killed."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "run_file")
    name = f"{ITERS:07d}_adapters.safetensors"
    killed("before-replace", name, "train", str(config))
    assert any(n.startswith(f".{name}.") for n in leftovers(run_dir)), leftovers(run_dir)
    resumed(run_dir)
    assert [n for n in leftovers(run_dir) if n != ".lock"] == []
    resuming.compare_runs(reference[0], run_dir)
