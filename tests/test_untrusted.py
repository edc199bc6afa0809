"""A run folder is input from a stranger: every tampering is one clear error, and nothing else.

One real base run (tiny LoRA model, int8 moments: codes + scales) is built once; each test copies
it, tampers the copy as an attacker would — rewriting ``manifest.json`` so that every size and
hash matches again — and checks that the loader refuses it with one line naming the file and the
problem, within a bounded time, without reading or writing anything in a sentinel folder beside
the run (whose content the errors must never reveal).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from adamw_lm import AdamW, checkpoint, resuming
from adamw_lm.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from helpers.training import LORA, lm_steps, lora_model

STEP = 2
SECRET = "SECRET-7f3a9c"


def make_optimizer() -> AdamW:
    return AdamW(1e-2, state_precision="int8", min_quantize_size=0, seed=3)


@pytest.fixture(scope="session")
def base_run(tiny_model_path, tmp_path_factory) -> Path:
    """A run with one checkpoint (step 2) of two real LoRA steps, as adamw_lm.trainer saves it."""
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    losses = lm_steps(model, optimizer, STEP)
    state = {"iteration": STEP, "epoch": 0, "offset": 4, "losses": losses, "val_losses": [],
             "seed": 0, "config": {"model": str(tiny_model_path)}}
    adapter_config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA}
    run_dir = tmp_path_factory.mktemp("base") / "run"
    checkpoint.save(run_dir, STEP, model, optimizer, state, adapter_config)
    return run_dir


_frozen: dict[Path, dict] = {}


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A fresh copy of the base run, with a sentinel folder beside it that must stay untouched.

    A test that plants an attacker's files in the sentinel calls :func:`freeze` afterwards.
    """
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    sentinel = sentinel_of(run_dir)
    sentinel.mkdir()
    (sentinel / "secret.txt").write_text(f"{SECRET}\n")
    freeze(run_dir)
    yield run_dir
    assert snapshot(sentinel) == _frozen.pop(sentinel), "something outside the run was changed"


def freeze(run_dir: Path) -> None:
    """Take the state of the sentinel folder that must hold at the end of the test."""
    _frozen[sentinel_of(run_dir)] = snapshot(sentinel_of(run_dir))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, size and content hash (links are not followed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            found[str(path)] = ("dir",)
    return found


def step_dir(run_dir: Path, step: int = STEP) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def sentinel_of(run_dir: Path) -> Path:
    return run_dir.parent / "sentinel"


def rewrite_manifest(folder: Path, **changes) -> None:
    """Make every listed size and sha256 match the files again (the attacker owns the manifest)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for name, record in manifest["files"].items():
        target = folder / name
        if target.is_file():  # through links too: the attacker knows what they link to
            data = target.read_bytes()
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def rewrite_json(folder: Path, name: str, change) -> None:
    path = folder / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    rewrite_manifest(folder)


def rewrite_safetensors(folder: Path, name: str, change) -> None:
    path = folder / name
    arrays, metadata = mx.load(str(path), return_metadata=True)
    change(arrays, metadata)
    path.unlink()
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    rewrite_manifest(folder)


@contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(run_dir: Path, target: Path, error=CorruptCheckpointError, *, model_path=None) -> str:
    """The one-line error of verifying (and, with ``model_path``, loading) ``target``."""
    with within(20), pytest.raises(error) as e:
        checkpoint.verify(target)
        if model_path is not None:
            model, optimizer = lora_model(model_path), make_optimizer()
            before = dict(tree_flatten(model.trainable_parameters()))
            try:
                checkpoint.load(target, model, optimizer)
            finally:  # nothing was changed by the failed load
                after = dict(tree_flatten(model.trainable_parameters()))
                assert all(after[k] is before[k] for k in before)
                assert optimizer.state["step"].item() == 0
    message = str(e.value)
    assert "\n" not in message, message
    assert SECRET not in message and str(sentinel_of(run_dir)) not in message, message
    return message


# -- links and special files ---------------------------------------------------------------------


def test_base_run_loads(run, tiny_model_path):
    """The untampered copy verifies and loads: the refusals below are about the tampering."""
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    path, state = checkpoint.load_latest(run, model, optimizer)
    assert path == step_dir(run) and state["iteration"] == STEP
    assert optimizer.state["step"].item() == STEP
    assert any(k.endswith(".scales") for k, _ in tree_flatten(optimizer.state))


def test_a_checkpoint_is_hashed_once_per_load(run, tiny_model_path, monkeypatch):
    from adamw_lm.checkpoint import untrusted

    hashed = []
    sha256 = untrusted.OpenFile.sha256
    monkeypatch.setattr(untrusted.OpenFile, "sha256", lambda f: hashed.append(f.label) or sha256(f))
    listed = len(checkpoint.verify(step_dir(run))["files"])
    hashed.clear()

    checkpoint.load_latest(run, lora_model(tiny_model_path), make_optimizer())
    assert len(hashed) == listed
    hashed.clear()
    # The trainer's way: read the trainer state (to rebuild the model), then load the same bytes.
    with checkpoint.open_latest(run) as found:
        assert found.trainer_state["iteration"] == STEP and found.path == step_dir(run)
        state = checkpoint.load(found, lora_model(tiny_model_path), make_optimizer())
    assert state == found.trainer_state and len(hashed) == listed


def test_without_fd_paths_mlx_reads_the_resolved_path_only_if_it_is_the_same_file(
    run, tiny_model_path, monkeypatch
):
    from adamw_lm.checkpoint import untrusted

    stat = os.stat

    def no_fd_paths(path, *args, **kwargs):  # as on a system without /proc/self/fd or /dev/fd
        if str(path).startswith(("/proc/self/fd/", "/dev/fd/")):
            raise FileNotFoundError(path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(untrusted.os, "stat", no_fd_paths)
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    assert checkpoint.load(step_dir(run), model, optimizer)["iteration"] == STEP

    # The file verified was swapped for another under the same name before mlx opened it.
    with checkpoint.open_verified(step_dir(run)) as found:
        path = step_dir(run) / "adapters.safetensors"
        os.rename(path, path.with_suffix(".old"))
        shutil.copy(path.with_suffix(".old"), path)
        with pytest.raises(CorruptCheckpointError, match="was replaced while it was being read"):
            checkpoint.load(found, lora_model(tiny_model_path), make_optimizer())


def test_listed_file_linked_out_of_the_folder_is_refused_without_an_oracle(run):
    folder = step_dir(run)
    outside = sentinel_of(run) / "adapters.safetensors"
    shutil.copy(folder / "adapters.safetensors", outside)  # same bytes: size and hash would match
    (folder / "adapters.safetensors").unlink()
    (folder / "adapters.safetensors").symlink_to(outside)
    freeze(run)
    message = refused(run, folder)
    assert message.endswith(f"adapters.safetensors is a link that leads out of {folder}")

    # A link to a secret: the error says neither its size nor its hash.
    (folder / "trainer_state.json").unlink()
    (folder / "trainer_state.json").symlink_to(sentinel_of(run) / "secret.txt")
    message = refused(run, folder)
    secret = (sentinel_of(run) / "secret.txt").read_bytes()
    assert hashlib.sha256(secret).hexdigest() not in message
    assert f"found {len(secret)}" not in message


def test_links_inside_the_folder_and_into_a_hub_cache_are_followed(run, tiny_model_path, tmp_path):
    folder = step_dir(run)
    os.rename(folder / "adapter_config.json", folder / "config-copy.json")
    (folder / "adapter_config.json").symlink_to("config-copy.json")
    assert checkpoint.verify(folder)["step"] == STEP

    # The layout huggingface_hub.snapshot_download makes: snapshot files link to ../../blobs/<sha>.
    repo = tmp_path / "hub" / "models--someone--run"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(run, snapshot / "run")
    (repo / "blobs").mkdir()
    hub_folder = step_dir(snapshot / "run")
    for entry in list(hub_folder.iterdir()):
        data = entry.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        entry.unlink()
        entry.symlink_to(os.path.relpath(blob, hub_folder))
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    path, state = checkpoint.load_latest(snapshot / "run", model, optimizer)
    assert path == hub_folder and state["iteration"] == STEP

    # The same links from a folder that is not a snapshot of that cache lead out of it.
    elsewhere = tmp_path / "elsewhere" / "step-0000002"
    shutil.copytree(hub_folder, elsewhere, symlinks=True)
    for entry in elsewhere.iterdir():
        target = os.path.realpath(hub_folder / entry.name)
        entry.unlink()
        entry.symlink_to(target)
    with pytest.raises(CorruptCheckpointError, match="is a link that leads out of"):
        checkpoint.verify(elsewhere)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_never_hang(run, special):
    folder = step_dir(run)
    target = folder / "trainer_state.json"
    target.unlink()
    if special == "fifo":
        os.mkfifo(target)
        expected = "trainer_state.json is not a regular file"
    else:
        target.symlink_to(special)
        expected = "trainer_state.json is a link that leads out of"
    assert expected in refused(run, folder)
    with within(20):
        assert checkpoint.latest_checkpoint(run) is None  # the only checkpoint is unusable


def test_step_folder_linked_out_of_the_run_is_never_used(run, caplog):
    outside = sentinel_of(run) / "step-0000009"
    shutil.copytree(step_dir(run), outside)
    rewrite_json(outside, "trainer_state.json", lambda s: s.update(iteration=9))
    rewrite_manifest(outside, step=9)
    checkpoints = run / "checkpoints"
    (checkpoints / "step-0000009").symlink_to(outside)
    freeze(run)

    # Not a candidate by itself...
    (checkpoints / "latest").unlink()
    assert checkpoint.latest_checkpoint(run) == step_dir(run)
    # ...nor when latest names it: a warning, then the newest real folder.
    (checkpoints / "latest").write_text("step-0000009\n")
    assert checkpoint.latest_checkpoint(run) == step_dir(run)
    warnings = [r.getMessage() for r in caplog.records if r.name == "adamw_lm.checkpoint"]
    assert len(warnings) == 1 and "step-0000009 is a link out of the run folder" in warnings[0]
    assert "\n" not in warnings[0]

    # A save into the run replaces neither the link's target nor rotates it away.
    model, optimizer = lora_model_from(run), make_optimizer()
    checkpoint.save(run, 3, model, optimizer, {}, {}, keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000003",
                                                              "step-0000009"]


@pytest.mark.parametrize("name", [
    "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0669",  # Arabic-Indic digits: int() reads 9
    "step-00000009",  # a second spelling of step 9
    "step-" + "9" * 200,  # past any step (a Hub path can pass int()'s 4300-digit limit)
])
def test_step_folders_only_as_the_writer_names_them(run, name):
    outside_name = run / "checkpoints" / name
    shutil.copytree(step_dir(run), outside_name)
    rewrite_json(outside_name, "trainer_state.json", lambda s: s.update(iteration=9))
    rewrite_manifest(outside_name, step=9)
    (run / "checkpoints" / "latest").unlink()
    assert checkpoint.steps(run) == [2]
    assert checkpoint.latest_checkpoint(run) == step_dir(run)
    (run / "checkpoints" / "latest").write_text(name + "\n")
    assert checkpoint.latest_checkpoint(run) == step_dir(run)

def test_resume_step_never_uses_a_step_folder_linked_out_of_the_run(run):
    """``resume --step N`` takes the step folder through the same rules as the latest one."""
    outside = sentinel_of(run) / "step-0000009"
    shutil.copytree(step_dir(run), outside)
    rewrite_json(outside, "trainer_state.json", lambda s: s.update(iteration=9))
    rewrite_manifest(outside, step=9)
    (run / "checkpoints" / "step-0000009").symlink_to(outside)
    freeze(run)
    with within(20), pytest.raises(checkpoint.NoCheckpointError) as e:
        resuming.resume(run, step=9, progress=False)
    assert "no checkpoint at step 9 (checkpoints: 2)" in str(e.value)
    assert checkpoint.steps(run) == [STEP]


def lora_model_from(run_dir: Path) -> nn.Module:
    config = json.loads((step_dir(run_dir) / "trainer_state.json").read_text())["config"]
    return lora_model(Path(config["model"]))


@pytest.mark.parametrize("kind", ["secret", "dev-zero", "huge", "not-a-name"])
def test_bad_latest_is_ignored_without_echoing_it(run, caplog, kind):
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    if kind == "secret":
        latest.symlink_to(sentinel_of(run) / "secret.txt")
        problem = "is a link that leads out of"
    elif kind == "dev-zero":
        latest.symlink_to("/dev/zero")
        problem = "is a link that leads out of"
    elif kind == "huge":
        latest.write_bytes(b"step-0000002" + b" " * (64 << 20))
        problem = "over the 64-byte limit"
    else:
        latest.write_text(f"{SECRET}\n")
        problem = "it does not hold a checkpoint name"
    with within(20):
        assert checkpoint.latest_checkpoint(run) == step_dir(run)  # the fallback still works
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "adamw_lm.checkpoint"]
    assert problem in warning and "\n" not in warning and SECRET not in warning, warning


def test_checkpoints_folder_linked_out_of_the_run(run, tiny_model_path):
    other = sentinel_of(run) / "other-run"
    shutil.copytree(run / "checkpoints", other)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other)
    freeze(run)
    with pytest.raises(CorruptCheckpointError, match="checkpoints is a link that leads out of"):
        checkpoint.latest_checkpoint(run)
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(run, 3, model, optimizer, {}, {}, keep_last=1)
    assert f"{run / 'checkpoints'} is a link that leads out of the run folder" in str(e.value)


def test_planted_links_at_temporary_names_are_never_written_through(run, tiny_model_path):
    checkpoints = run / "checkpoints"
    secret = sentinel_of(run) / "secret.txt"
    target_dir = sentinel_of(run) / "dir"
    target_dir.mkdir()
    (target_dir / "keep.txt").write_text("keep")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pid = os.getpid()
    # Every name a save used before temporary names were unique, and stale-looking leftovers.
    for name in (f".tmp-step-0000003-{pid}", f".tmp-latest-{pid}", f".tmp-probe-{pid}",
                 f".trash-step-0000002-{pid}", f".tmp-latest-{dead}"):
        (checkpoints / name).symlink_to(secret)
    (checkpoints / f".tmp-step-0000004-{dead}").symlink_to(target_dir)
    (checkpoints / "step-0000003").symlink_to(target_dir)  # a save of step 3 replaces it
    freeze(run)
    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    path = checkpoint.save(run, 3, model, optimizer, {"iteration": 3}, {}, keep_last=1)
    assert path.is_dir() and not path.is_symlink() and checkpoint.verify(path)["step"] == 3
    left = sorted(p.name for p in checkpoints.iterdir())
    assert f".tmp-latest-{dead}" not in left and f".tmp-step-0000004-{dead}" not in left
    assert {"latest", "step-0000003"} <= set(left)


def test_planted_aside_folders_are_never_followed_or_put_back_for_another_step(run):
    """What a killed save moved aside is put back (checkpoint.recover, every save): a folder planted
    under such a name as a link out of the run is removed as a link, its target untouched, and one
    whose checkpoint is of another step is removed, not put back under the name."""
    checkpoints, token = run / "checkpoints", "0123456789abcdef"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outside = sentinel_of(run) / "step-0000007"
    shutil.copytree(step_dir(run), outside)
    rewrite_json(outside, "trainer_state.json", lambda s: s.update(iteration=7))
    rewrite_manifest(outside, step=7)
    (checkpoints / f".trash-step-0000007-{token}-{dead}").symlink_to(outside)
    shutil.copytree(step_dir(run), checkpoints / f".trash-step-0000008-{token}-{dead}")  # step 2
    # And a run folder's temporary name planted as a link: only regular files are removed.
    (run / ".adapters.safetensors.abcdefgh.tmp").symlink_to(sentinel_of(run) / "secret.txt")
    (run / ".adapters.safetensors.ijklmnop.tmp").write_bytes(b"left by a killed write")
    freeze(run)
    assert checkpoint.recover(run) == []
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", f"step-{STEP:07d}"]
    from adamw_lm.runfiles import remove_temporaries
    from adamw_lm.trainer import RUN_FILES

    assert remove_temporaries(run, RUN_FILES) == [".adapters.safetensors.ijklmnop.tmp"]
    assert (run / ".adapters.safetensors.abcdefgh.tmp").is_symlink()


# -- JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("manifest.json", b" " * (2 << 20), "manifest.json is 2097152 bytes, over the 1048576"),
        ("trainer_state.json", b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
        ("trainer_state.json", b"[" * 40 + b"]" * 40, "nested deeper than 32 levels"),
        ("trainer_state.json", b'{"iteration": 2, "iteration": 2}', "has a duplicate key"),
        ("adapter_config.json", b'{"rank": NaN}', "holds NaN, which JSON does not allow here"),
        ("adapter_config.json", b'{"rank": 1e999}', "holds a number too large for a float"),
        ("trainer_state.json", b'{"iteration": 2, "config": {"learning_rate": Infinity}}',
         "holds NaN or an infinite number outside its loss lists"),
        ("trainer_state.json", b"\xff\xfe{}", "trainer_state.json is not UTF-8 text"),
        ("trainer_state.json", b'{"x": [' + b"{}," * 2_000_000 + b"{}]}",
         "opens more than 2000000 objects and arrays"),
        ("trainer_state.json", f'{{"{SECRET}": 1'.encode(), "is not valid JSON (line 1 column"),
    ],
)  # fmt: skip
def test_hostile_json_is_refused_fast(run, name, content, problem):
    folder = step_dir(run)
    (folder / name).write_bytes(content)
    if name != "manifest.json":
        rewrite_manifest(folder)
    start = time.perf_counter()
    assert problem in refused(run, folder)
    assert time.perf_counter() - start < 5


def test_huge_trainer_state_is_refused_before_it_is_read(run):
    folder = step_dir(run)
    with open(folder / "trainer_state.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: the size is what counts
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"]["size"] = 65 << 20
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "over the 67108864-byte limit" in refused(run, folder)


# -- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s.update(iteration=7), "iteration 7 is not the checkpoint's step 2"),
        (lambda s: s.update(iteration="2"), "iteration must be an int"),
        (lambda s: s.update(iteration=10**15), "iteration must be an int from 0 to"),
        (lambda s: s.update(offset=-1), "offset must be an int from 0 to"),
        (lambda s: s.update(epoch=2**70), "epoch must be an int from 0 to"),
        (lambda s: s.update(seed=2**64), "seed must be an int from 0 to 2**64 - 1"),
        (lambda s: s.update(losses="1.0"), "losses must be a list of at most 2 numbers"),
        (lambda s: s.update(losses=[1.0] * 3), "losses must be a list of at most 2 numbers"),
        (lambda s: s.update(val_losses=[[1, "x"]]), "val_losses must be a list of [iteration"),
        (lambda s: s.update(config=[]), "config must be a JSON object"),
        (lambda s: s["config"].update(checkpoint=[1]), "config.checkpoint must be a JSON object"),
        (lambda s: s["config"].update(optimizer="x"), "config.optimizer must be a JSON object"),
        (lambda s: s.update(report_start="x"), "report_start must be an int from 0 to the step 2"),
        (lambda s: s.update(report_start=3), "report_start must be an int from 0 to the step 2"),
        (lambda s: s.update(trained_tokens=2.5), "trained_tokens must be an int from 0 to"),
        (lambda s: s.update(versions={"mlx": "\x1b[2J"}), "versions must map package names"),
        (lambda s: s.clear() or s.update(x=[1]), None),  # only the fields it has are checked
    ],
)  # fmt: skip
def test_trainer_state_schema(run, change, problem):
    folder = step_dir(run)
    rewrite_json(folder, "trainer_state.json", change)
    if problem is None:
        assert checkpoint.verify(folder)["step"] == STEP
    else:
        assert f"trainer_state.json: {problem}" in refused(run, folder)


def test_trainer_state_that_is_not_an_object(run):
    folder = step_dir(run)
    (folder / "trainer_state.json").write_text("[1, 2]")
    rewrite_manifest(folder)
    assert "trainer_state.json: must hold a JSON object" in refused(run, folder)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"step": 3}, "step 3 is not the step of its folder (step-0000002)"),
        ({"step": -1}, "step must be an int from 0 to"),
        ({"val_loss": "low"}, "val_loss must be a finite number or null"),
        ({"adamw_lm_version": "\x1b]0;x"}, "adamw_lm_version must be a version string"),
        ({"optimizer_shards": [{"file": "optimizer.safetensors", "rank": 1, "world_size": 1}]},
         "each optimizer shard must name a listed file, with int rank < world_size"),
        ({"files": {f"f{i}": {"size": 0, "sha256": "0" * 64} for i in range(65)}},
         "'files' must map up to 64 file names"),
    ],
)  # fmt: skip
def test_manifest_schema(run, changes, problem):
    folder = step_dir(run)
    rewrite_manifest(folder, **changes)
    assert f"manifest.json: {problem}" in refused(run, folder)


# -- arrays ------------------------------------------------------------------------------------


def first_key(arrays: dict, suffix: str) -> str:
    return next(k for k in sorted(arrays) if k.endswith(suffix))


@pytest.mark.parametrize(
    ("name", "which", "value"),
    [
        ("adapters.safetensors", "lora_a", float("nan")),
        ("optimizer.safetensors", "m.scales", float("inf")),
        ("optimizer.safetensors", "v.scales", float("nan")),
        ("optimizer.safetensors", "learning_rate", float("nan")),
        # A block's scale is its largest magnitude: a negative one would flip or blow up steps.
        ("optimizer.safetensors", "v.scales", -1.0),
        ("optimizer.safetensors", "m.scales", -1e-3),
    ],
)
def test_non_finite_arrays_are_refused(run, tiny_model_path, name, which, value):
    folder = step_dir(run)

    def poison(arrays, _):
        key = first_key(arrays, which)
        arrays[key] = mx.where(mx.arange(arrays[key].size).reshape(arrays[key].shape) == 0,
                               mx.array(value, arrays[key].dtype), arrays[key])

    rewrite_safetensors(folder, name, poison)
    message = refused(run, folder, model_path=tiny_model_path)
    extra = " (or negative second moments or block scales)" if name.startswith("optimizer") else ""
    assert f"{name}: 1 arrays hold NaN or infinite values{extra} (first: " in message
    assert message.rstrip(")").endswith(which)


@pytest.mark.parametrize(
    ("which", "array", "problem"),
    [
        ("step", mx.array(2.0), "optimizer state step is () float32; this optimizer expects () "
                                "uint64"),
        ("step", mx.array([2, 2], mx.uint64), "optimizer state step is (2,) uint64"),
        ("learning_rate", mx.zeros((3,)), "optimizer state learning_rate is (3,) float32"),
        ("skipped_steps", mx.array(0, mx.int64), "optimizer state skipped_steps is () int64"),
    ],
)  # fmt: skip
def test_optimizer_scalars_of_the_wrong_dtype_or_shape(run, tiny_model_path, which, array,
                                                       problem):
    folder = step_dir(run)
    rewrite_safetensors(folder, "optimizer.safetensors",
                        lambda arrays, _: arrays.update({which: array}))
    message = refused(run, folder, IncompatibleCheckpointError, model_path=tiny_model_path)
    assert f"optimizer.safetensors: {problem}" in message


@pytest.mark.parametrize("which", ["step", "learning_rate"])
def test_optimizer_scalars_cannot_be_dropped(run, tiny_model_path, which):
    folder = step_dir(run)
    rewrite_safetensors(folder, "optimizer.safetensors", lambda arrays, _: arrays.pop(which))
    message = refused(run, folder, model_path=tiny_model_path)
    assert message.endswith(f"optimizer.safetensors: optimizer state has no {which!r}")


@pytest.mark.parametrize("value, loads", [(float("inf"), True), (float("nan"), False), (-1.0, False)])
@pytest.mark.parametrize("into", [None, "int8"])
def test_an_infinite_float_second_moment_loads_as_mlx_leaves_it(tmp_path, tiny_model_path, value,
                                                                 loads, into):
    """mlx's AdamW leaves v = +inf where a gradient's square overflowed (that element is frozen): a
    checkpoint of such a state loads, converted to int8 too (v capped at the largest bfloat16). A
    NaN or a negative second moment is refused, before a conversion could hide it."""
    from mlx.utils import tree_unflatten

    model, optimizer = lora_model(tiny_model_path), AdamW(1e-2)  # precision None: mlx's state
    losses = lm_steps(model, optimizer, 1)
    flat = dict(tree_flatten(optimizer.state))
    key = first_key(flat, ".v")
    flat[key] = mx.where(mx.arange(flat[key].size).reshape(flat[key].shape) == 0, value, flat[key])
    optimizer.state = tree_unflatten(list(flat.items()))
    state = {"iteration": 1, "epoch": 0, "offset": 2, "losses": losses, "val_losses": [], "seed": 0}
    adapter_config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA}
    checkpoint.save(tmp_path, 1, model, optimizer, state, adapter_config)
    restored = AdamW(1e-2, state_precision=into, min_quantize_size=0)
    load = lambda: checkpoint.load_latest(  # noqa: E731
        tmp_path, lora_model(tiny_model_path), restored, convert_precision=into is not None
    )
    if loads:
        load()
        restored_state = dict(tree_flatten(restored.state))
        if into is None:
            assert mx.isinf(restored_state[key]).any().item()
        else:
            assert mx.isfinite(restored_state[f"{key}.scales"]).all().item()
    else:
        with pytest.raises(CorruptCheckpointError, match=f"negative second moments.*first: {key}"):
            load()


def test_optimizer_step_must_be_the_runs_number_of_updates(tmp_path, tiny_model_path, data_dir):
    """The optimizer's step drives the schedule and the bias correction: a step that is not the
    run's number of updates (iteration / grad_accumulation_steps) is refused on resume."""
    from adamw_lm import trainer
    from adamw_lm.config import load_config
    from test_resume import make_config

    run_dir = tmp_path / "real"
    config = make_config(tmp_path, tiny_model_path, data_dir, run_dir, iters=6,
                         grad_accumulation_steps=2)  # fmt: skip
    trainer.run(load_config(config), progress=False)
    rewrite_safetensors(step_dir(run_dir, 6), "optimizer.safetensors",
                        lambda arrays, _: arrays.update(step=mx.array(10**15, mx.uint64)))
    with pytest.raises(CorruptCheckpointError) as e:
        resuming.resume(run_dir, overrides={"iters": 8}, progress=False)
    assert ("optimizer state's step is 1000000000000000, but iteration 6 with "
            "grad_accumulation_steps 2 makes 3 updates") in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "error", "problem"),
    [
        ("precision_plan", "{not json", CorruptCheckpointError, "is not valid JSON"),
        ("precision_plan", "[1, 2]", CorruptCheckpointError, "must be JSON objects"),
        ("precision_plan", '{"model.layers.1.self_attn.q_proj.lora_a": "int3"}',
         IncompatibleCheckpointError, "precision this adamw_lm does not have"),
        ("hyperparameters", '"lr"', CorruptCheckpointError, "must be JSON objects"),
        ("hyperparameters", '{"eps": -1e-8}', CorruptCheckpointError, "has eps -1e-08; expected"),
        ("hyperparameters", '{"eps": "1e-8"}', CorruptCheckpointError, "has eps '1e-8'; expected"),
        ("hyperparameters", '{"eps": true}', CorruptCheckpointError, "has eps True; expected"),
        ("format_version", "one", CorruptCheckpointError, "'format_version' must be an int"),
        ("optimizer", "os.system('x')", CorruptCheckpointError, "must be a class name"),
    ],
)  # fmt: skip
def test_bad_optimizer_metadata(run, key, value, error, problem):
    folder = step_dir(run)
    rewrite_safetensors(folder, "optimizer.safetensors",
                        lambda _, metadata: metadata.update({key: value}))
    assert problem in refused(run, folder, error)


def test_int4_state_without_eps_is_refused(run):
    """int4's first moment is stored relative to eps: a plan with int4 state and no eps to read it
    with is refused when verified, before anything is decoded."""
    folder = step_dir(run)

    def change(_, metadata):
        plan = json.loads(metadata["precision_plan"])
        hyper = json.loads(metadata["hyperparameters"])
        del hyper["eps"]
        metadata.update(precision_plan=json.dumps(dict.fromkeys(plan, "int4")),
                        hyperparameters=json.dumps(hyper))  # fmt: skip

    rewrite_safetensors(folder, "optimizer.safetensors", change)
    assert "'hyperparameters' has no eps, which int4 state" in refused(run, folder)


def test_safetensors_header_lies(run):
    folder = step_dir(run)
    path = folder / "adapters.safetensors"
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [2**31 - 1, 2**31 - 1]  # a huge array from a few bytes
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])
    rewrite_manifest(folder)
    assert "has data offsets that do not fit its shape" in refused(run, folder)

    # A header length past the cap (or the file) is refused before anything is parsed.
    path.write_bytes((17 << 20).to_bytes(8, "little") + b"{" + b" " * (17 << 20))
    rewrite_manifest(folder)
    assert "is not a safetensors file (header length out of range)" in refused(run, folder)


def test_load_adapters_only_reads_mlx_lm_folders_under_the_same_rules(run, tiny_model_path):
    adapters = run.parent / "adapters"  # as mlx_lm lora writes it: no manifest to verify
    adapters.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(step_dir(run) / name, adapters / name)
    config = checkpoint.load_adapters_only(adapters, lora_model(tiny_model_path))
    assert config["lora_parameters"] == LORA

    # Large but finite values whose sum overflows are finite: no false alarm.
    weights = mx.load(str(adapters / "adapters.safetensors"))
    key = first_key(weights, "lora_b")
    weights[key] = mx.full(weights[key].shape, 3e38)
    assert not mx.isfinite(mx.sum(weights[key])).item()
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    checkpoint.load_adapters_only(adapters, lora_model(tiny_model_path))

    weights = mx.load(str(adapters / "adapters.safetensors"))
    key = first_key(weights, "lora_b")
    weights[key] = mx.full(weights[key].shape, float("inf"))
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    model = lora_model(tiny_model_path)
    before = dict(tree_flatten(model.trainable_parameters()))
    with pytest.raises(CorruptCheckpointError, match="1 arrays hold NaN or infinite values"):
        checkpoint.load_adapters_only(adapters / "adapters.safetensors", model)
    after = dict(tree_flatten(model.trainable_parameters()))
    assert all(after[k] is before[k] for k in before)

    (adapters / "adapter_config.json").unlink()
    (adapters / "adapter_config.json").symlink_to(sentinel_of(run) / "secret.txt")
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.load_adapters_only(adapters, model)
    link = adapters / "adapter_config.json"
    assert str(e.value) == f"{link} is a link that leads out of {adapters}"


# -- the command line --------------------------------------------------------------------------


def inspect(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "adamw_lm.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_cli_inspect_of_hostile_folders_exits_2_with_one_line(run):
    folder = step_dir(run)
    done = inspect(folder)
    assert done.returncode == 0 and "moment precisions: int8" in done.stdout, done.stderr

    (folder / "trainer_state.json").write_bytes(b"[" * 100_000)
    rewrite_manifest(folder)
    cases = [(folder, "trainer_state.json is nested deeper than 32 levels")]
    other = sentinel_of(run) / "elsewhere"
    shutil.copytree(run / "checkpoints", other)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other)
    freeze(run)
    cases.append((run, "checkpoints is a link that leads out of the run folder"))
    for path, problem in cases:
        done = inspect(path)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and "Traceback" not in done.stderr, lines
        assert lines[0].startswith("adamw-lm inspect: error:")
