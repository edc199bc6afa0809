"""A run killed (SIGKILL) at the moments between the writes of a save resumes into the same run:
after its last checkpoint, while a save replaces a step folder, and while a run folder's file is
being replaced. tests/helpers/kill_at.py kills the CLI at each moment exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adamw_lm import checkpoint, reports, resuming
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


def trained(*args: str) -> None:
    done = subprocess.run(cli(*args, "--no-progress"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def same_folder(reference: Path, run_dir: Path) -> None:
    """The same run: checkpoints, the run folder's files (mlx-lm's adapters byte for byte), and
    the metrics log record for record (timings aside)."""
    resuming.compare_runs(reference, run_dir)
    names = sorted(p.name for p in reference.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == names
    for name in names:
        if name.endswith(".safetensors"):
            assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name

    def records(folder: Path) -> list[dict]:
        timing = ("tokens_per_second", "peak_memory_gb")
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    assert records(run_dir) == records(reference)


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
    puts the old one back instead of deleting it with the leftovers, and goes on from step 6,
    which latest has named since the resume from it started."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "replace")
    subprocess.run(cli("train", str(config), "--no-progress"), check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    killed("between-renames", str(ITERS), "resume", str(run_dir), "--step", "6")
    root, name = run_dir / "checkpoints", f"step-{ITERS:07d}"
    assert not (root / name).exists()
    assert any(n.startswith(f".trash-{name}-") for n in leftovers(root)), leftovers(root)
    out = resumed(run_dir, "--iters", str(ITERS + 2))
    assert f"Put back {name}" in out and "Resuming" in out and "from iteration 6" in out, out
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


def test_killed_while_overwrite_removes_the_old_run(reference, tiny_model_path, data_dir):
    """--overwrite removes the old run's files, then its checkpoints: killed in between, the old
    run is still there as one, and the next --overwrite removes the rest (mlx-lm's numbered
    adapters of its later iterations would otherwise pass for this run's)."""
    run_dir = reference[1] / "overwrite"
    trained("train", str(make_config(reference[1], tiny_model_path, data_dir, run_dir, iters=18,
                                     save_every=6)))  # fmt: skip
    assert (run_dir / "0000018_adapters.safetensors").is_file()
    config, _ = config_for(reference, tiny_model_path, data_dir, "overwrite")
    killed("before-rmtree", "checkpoints", "train", str(config), "--overwrite")
    assert not (run_dir / "0000018_adapters.safetensors").exists()
    trained("train", str(config), "--overwrite")
    same_folder(reference[0], run_dir)


def test_killed_in_its_first_save(reference, tiny_model_path, data_dir):
    """Killed before its first checkpoint, a run has nothing to resume from: resume says to train
    it again, and train takes the folder (no step folder in it) without --overwrite."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "first_save")
    killed("between-renames", "6", "train", str(config))
    done = subprocess.run(cli("resume", str(run_dir), "--no-progress"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2 and "starts over with `adamw-lm train CONFIG`" in done.stderr, done.stderr
    trained("train", str(config))
    same_folder(reference[0], run_dir)


def test_killed_resuming_from_an_earlier_step(reference, tiny_model_path, data_dir):
    """A resume from step 6 of a finished run, killed before its next checkpoint: latest names
    step 6 from the start of that resume, so the next plain resume goes on from there, and the
    log it cut at step 6 reads as one run again at the end."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "earlier_step")
    trained("train", str(config))
    killed("at-iteration", "9", "resume", str(run_dir), "--step", "6")
    assert "from iteration 6" in resumed(run_dir)
    same_folder(reference[0], run_dir)


def test_killed_extending_a_finished_run(reference, tiny_model_path, data_dir):
    """Extended with --iters and killed before the extension's first checkpoint, a run is still
    the finished one: a plain resume drops the extension's records and mlx-lm adapters."""
    config, run_dir = config_for(reference, tiny_model_path, data_dir, "extended")
    trained("train", str(config))
    killed("at-iteration", "16", "resume", str(run_dir), "--iters", "20", "--save-every", "2")
    assert (run_dir / "0000014_adapters.safetensors").is_file()
    assert "nothing to do" in resumed(run_dir)
    same_folder(reference[0], run_dir)
