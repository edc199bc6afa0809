"""Runs on the Hub end to end: `adamw-lm train` with `hub:`, `resume hub:...`, `push`, `inspect`,
against the local Hub (tests/hub_server.py) with the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

from adamw_lm import checkpoint, hub_runs, resuming, trainer
from adamw_lm.config import ConfigError, from_dict, load_config
from adamw_lm import hub as hub_module
from adamw_lm.hub import Pusher

ITERS = 8  # the whole run; the first machine stops at HALF
HALF = 4


def config(model: Path, data: Path, run_dir: Path, **extra) -> dict:
    cfg = {
        "model": str(model), "data": str(data), "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, "batch_size": 4, "iters": ITERS,
        "val_batches": 1, "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 100,
        "max_seq_length": 64, "adapter_path": str(run_dir), "seed": 5,
        "optimizer": {"state_precision": "int8", "min_quantize_size": 0},
        "checkpoint": {"every": 2, "keep_last": 2},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def cli(hub, *args: str, cwd: Path | None = None, token: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **hub.env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if token is not None:
        env["HF_TOKEN"] = token
    if not env["HF_TOKEN"]:  # no token at all (HF_HOME is fresh: no `hf auth login` either)
        del env["HF_TOKEN"]
    return subprocess.run([sys.executable, "-m", "adamw_lm.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def state_of(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


@pytest.fixture(scope="session")
def bf16_model_path(tmp_path_factory) -> Path:
    from adamw_lm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_bf16"), size="small", seed=0, dtype="bfloat16")


KINDS = {
    "lora-int8": {},
    "full-bf16": {"fine_tune_type": "full", "optimizer": {"state_precision": "bf16"}},
}


@pytest.fixture(scope="session")
def references(tiny_model_path, bf16_model_path, data_dir, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted local runs of ITERS iterations, one per kind (no Hub)."""
    found = {}
    for kind, extra in KINDS.items():
        model = bf16_model_path if kind == "full-bf16" else tiny_model_path
        run_dir = tmp_path_factory.mktemp(f"reference-{kind}") / "run"
        trainer.run(from_dict(config(model, data_dir, run_dir, **extra)), progress=False)
        found[kind] = run_dir
    return found


def first_machine(hub, tmp_path, model, data_dir, hub_settings: dict | None = None,
                  **extra) -> tuple[str, Path]:
    """`adamw-lm train` with a `hub:` section, stopping at HALF; returns the repo and run folder."""
    repo = hub.repo_id("run")
    run_dir = tmp_path / "office"
    cfg = write_yaml(tmp_path / "office.yaml", config(
        model, data_dir, run_dir, iters=HALF, hub={"repo_id": repo, **(hub_settings or {})}, **extra))
    done = cli(hub, "train", str(cfg), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"Pushed to {hub.url}/{repo}" in done.stdout
    return repo, run_dir


@pytest.mark.parametrize("kind", list(KINDS))
def test_push_then_resume_from_the_hub_equals_an_uninterrupted_run(kind, hub, tmp_path, tiny_model_path,
                                                                   bf16_model_path, data_dir, references):
    model = bf16_model_path if kind == "full-bf16" else tiny_model_path
    repo, office = first_machine(hub, tmp_path, model, data_dir, **KINDS[kind])
    files = hub.server.files(repo)
    assert files["checkpoints/latest"] == b"step-0000004\n"
    assert files["adapters.safetensors"] == (step_dir(office, HALF) / "adapters.safetensors").read_bytes()

    home = tmp_path / "home"  # another machine: a fresh working folder, a fresh HF cache
    done = cli(hub, "resume", f"hub:{repo}", "--iters", str(ITERS), "--no-progress", cwd=home.mkdir() or home)
    assert done.returncode == 0, done.stderr
    run_dir = home / "runs" / repo.split("/")[1]  # the default run folder
    assert "from iteration 4" in done.stderr
    message = resuming.compare_runs(run_dir, references[kind])  # every tensor and loss, bit for bit
    assert f"iteration {ITERS}" in message
    assert state_of(step_dir(run_dir, ITERS))["losses"] == state_of(step_dir(references[kind], ITERS))["losses"]
    # The resumed run kept pushing to the same repo.
    assert hub.server.files(repo)["checkpoints/latest"] == f"step-{ITERS:07d}\n".encode()
    assert state_of(step_dir(run_dir, ITERS))["exact"] is True


def test_resume_at_an_older_revision_and_at_a_step(hub, tmp_path, tiny_model_path, data_dir, references):
    repo, office = first_machine(hub, tmp_path, tiny_model_path, data_dir)
    first_commit = next(c for c in hub.server.history(repo) if c.title == "adamw-lm: checkpoint step-0000002")
    # At a step first: the resumed run pushes on into the repo, and keep_remote (= keep_last, 2)
    # then leaves steps 6 and 8 on main; the older commit still has step 2 as its latest.
    for name, source, extra in (("at-step", f"hub:{repo}", ("--step", "2")),
                                ("at-revision", f"hub:{repo}@{first_commit.oid}", ())):
        run_dir = tmp_path / name
        done = cli(hub, "resume", source, *extra, "--run-dir", str(run_dir), "--iters", str(ITERS),
                   "--no-progress")
        assert done.returncode == 0, done.stderr
        assert "from iteration 2" in done.stderr
        resuming.compare_runs(run_dir, references["lora-int8"])
        steps = sorted({p.split("/")[1] for p in hub.server.files(repo) if p.startswith("checkpoints/step-")})
        assert steps == ["step-0000006", "step-0000008"]


def test_a_user_without_write_access_is_told_before_training_and_can_push_elsewhere(
        hub, tmp_path, tiny_model_path, data_dir):
    repo, _ = first_machine(hub, tmp_path, tiny_model_path, data_dir)
    reader = hub.server.add_token(hub.user, write=False)
    run_dir = tmp_path / "colleague"
    done = cli(hub, "resume", f"hub:{repo}", "--run-dir", str(run_dir), "--iters", "6", "--no-progress",
               token=reader)
    one_line_error(done, "no write access", "--repo-id")
    assert not run_dir.exists()  # nothing trained, and the downloaded checkpoint taken out again

    own = hub.repo_id("mine")
    done = cli(hub, "resume", f"hub:{repo}", "--run-dir", str(run_dir), "--iters", "6",
               "--repo-id", own, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert hub.server.files(own)["checkpoints/latest"] == b"step-0000006\n"
    assert state_of(step_dir(run_dir, 6))["config"]["hub"]["repo_id"] == own


def test_a_checkpoint_does_not_choose_where_it_is_pushed_nor_publish_or_delete_there(
        hub, tmp_path, tiny_model_path, data_dir):
    """A run whose saved config names another repo than the one it is resumed from (here: pushed
    to ``copy`` after the fact, its config naming ``origin``), public, keeping one step on the
    Hub and pushing to a branch: resumed from ``copy``, it pushes to ``copy`` and nowhere else;
    resumed into a repo of one's own, that repo is private, nothing in it is deleted and its main
    branch is written, unless the flags say so."""
    origin, run_dir = first_machine(hub, tmp_path, tiny_model_path, data_dir,
                                    hub_settings={"private": False, "keep_remote": 1, "branch": "dev"},
                                    checkpoint={"every": 2, "keep_last": 1})  # fmt: skip
    copy = hub.repo_id("copy")
    assert cli(hub, "push", str(run_dir), "--repo-id", copy).returncode == 0
    before = hub.server.history(origin)
    done = cli(hub, "resume", f"hub:{copy}", "--run-dir", str(tmp_path / "a"), "--iters", "6",
               "--no-progress")
    assert done.returncode == 0, done.stderr
    assert hub.server.history(origin) == before
    assert hub.server.files(copy)["checkpoints/latest"] == b"step-0000006\n"

    fresh, shared = hub.repo_id("fresh"), hub.repo_id("shared")
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url, token=hub.token).create_repo(shared)
    hub.server.commit_files(shared, {"checkpoints/step-0000001/notes.txt": b"another run"})
    for repo, folder in ((fresh, "b"), (shared, "c")):
        done = cli(hub, "resume", f"hub:{copy}", "--step", "4", "--run-dir", str(tmp_path / folder),
                   "--iters", "6", "--repo-id", repo, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert "hub.private (--hub.private false)" in done.stderr, done.stderr
        assert "hub.keep_remote (--hub.keep_remote N)" in done.stderr
        assert "hub.branch (--hub.branch NAME)" in done.stderr
        assert hub.server.files(repo)["checkpoints/latest"] == b"step-0000006\n"  # on main
    assert hub.server.repos[fresh].private
    assert "checkpoints/step-0000001/notes.txt" in hub.server.files(shared)
    # Into the repo the saved config names (one could name any of yours): from elsewhere still.
    before = {p for p in hub.server.files(origin) if p.startswith("checkpoints/step-")}
    done = cli(hub, "resume", f"hub:{copy}", "--step", "4", "--run-dir", str(tmp_path / "d"),
               "--iters", "6", "--repo-id", origin, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"pushed to another repo than {copy}" in done.stderr
    assert "hub.keep_remote (--hub.keep_remote N)" in done.stderr
    assert before < {p for p in hub.server.files(origin) if p.startswith("checkpoints/step-")}


def test_no_token_anywhere_in_the_run_folder_or_on_the_server(hub, tmp_path, tiny_model_path, data_dir):
    repo, office = first_machine(hub, tmp_path, tiny_model_path, data_dir)
    secret = hub.token.encode()
    for path in office.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    for name, data in hub.server.files(repo).items():
        assert secret not in data, name
        assert hub.env["HF_HOME"].encode() not in data, name  # nor any environment value
    assert secret not in hub.server.stored_bytes()


@pytest.mark.parametrize("case", ["wrong-repo", "missing-revision", "missing-step", "tampered"])
def test_hub_resume_errors_are_one_line_exit_2(case, hub, tmp_path, tiny_model_path, data_dir):
    repo, office = first_machine(hub, tmp_path, tiny_model_path, data_dir)
    source, extra, words = {
        "wrong-repo": (f"hub:{hub.user}/no-such-run", (), ("not found",)),
        "missing-revision": (f"hub:{repo}@no-such-branch", (), ("revision not found",)),
        "missing-step": (f"hub:{repo}", ("--step", "3"), ("no checkpoint for step 3", "steps 4, 2")),
        "tampered": (f"hub:{repo}", (), ("adapters.safetensors",)),
    }[case]
    if case == "tampered":  # same size, other bytes: only the manifest's sha256 can tell
        name = "checkpoints/step-0000004/adapters.safetensors"
        data = bytearray(hub.server.files(repo)[name])
        data[-1] ^= 1
        hub.server.commit_files(repo, {name: bytes(data)})
    run_dir = tmp_path / "resumed"
    one_line_error(cli(hub, "resume", source, *extra, "--run-dir", str(run_dir), "--no-progress"), *words)
    assert checkpoint.latest_checkpoint(run_dir) is None if run_dir.exists() else True


def test_hub_resume_into_a_folder_of_another_run_is_refused(hub, tmp_path, tiny_model_path, data_dir):
    repo, office = first_machine(hub, tmp_path, tiny_model_path, data_dir)
    other = tmp_path / "other"
    done = cli(hub, "train", str(write_yaml(tmp_path / "other.yaml", config(tiny_model_path, data_dir, other,
                                                                           iters=2))), "--no-progress")
    assert done.returncode == 0, done.stderr
    before = sorted(p.name for p in (other / "checkpoints").iterdir())
    one_line_error(cli(hub, "resume", f"hub:{repo}", "--run-dir", str(other), "--no-progress"),
                   str(other), "another run", "--run-dir")
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before


def test_inspect_lists_remote_checkpoints_and_push_sends_a_run_after_the_fact(
        hub, tmp_path, tiny_model_path, data_dir, references):
    repo = hub.repo_id("after")
    done = cli(hub, "push", str(references["lora-int8"]), "--repo-id", repo)
    assert done.returncode == 0, done.stderr
    local = sorted(p.name for p in (references["lora-int8"] / "checkpoints").glob("step-*"))
    assert local == ["step-0000006", "step-0000008"]
    assert sorted({p.split("/")[1] for p in hub.server.files(repo) if p.startswith("checkpoints/step-")}) == local

    done = cli(hub, "inspect", f"hub:{repo}")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    last_loss = state_of(step_dir(references["lora-int8"], 8))["losses"][-1]
    assert rows[0].startswith(f"| 8 | {last_loss:.4f} |") and rows[0].rstrip().endswith("latest |")
    assert rows[1].startswith("| 6 |")

    one_line_error(cli(hub, "push", str(references["lora-int8"]), "--repo-id", repo, "--step", "5"),
                   "no checkpoint at step 5", "6, 8")
    one_line_error(cli(hub, "inspect", f"hub:{hub.user}/nothing-here"), "not found")


def test_fingerprints_refuse_another_model_or_data_unless_accepted(hub, tmp_path, tiny_model_path, data_dir):
    run_dir = tmp_path / "run"
    trainer.run(from_dict(config(tiny_model_path, data_dir, run_dir, iters=HALF)), progress=False)
    recorded = state_of(step_dir(run_dir, HALF))["fingerprints"]
    assert set(recorded["model"]["files"]) == {"config.json", "model.safetensors"}
    assert set(recorded["data"]["files"]) == {"train.jsonl", "valid.jsonl", "test.jsonl"}

    other_data = tmp_path / "data"
    shutil.copytree(data_dir, other_data, ignore=shutil.ignore_patterns("chat", "completions"))
    lines = (other_data / "train.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("a", "b", 1)  # as many records: only the fingerprint tells
    (other_data / "train.jsonl").write_text("\n".join(lines) + "\n")
    other_model = tmp_path / "model"
    shutil.copytree(tiny_model_path, other_model)
    cfg = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**cfg, "note": "another model"}))

    one_line_error(cli(hub, "resume", str(run_dir), "--data", str(other_data), "--iters", "6"),
                   "the data differs", "train.jsonl", "--accept-changed-data")
    one_line_error(cli(hub, "resume", str(run_dir), "--model", str(other_model), "--iters", "6"),
                   "the model differs", "config.json", "--accept-changed-model")
    # A path of the first machine that is not here: the option to give.
    one_line_error(cli(hub, "resume", str(run_dir), "--model", str(tmp_path / "elsewhere"), "--iters", "6"),
                   "does not exist on this machine", "--model PATH")
    # The same files in another place are the same run: no flag needed.
    same = tmp_path / "same-data"
    shutil.copytree(data_dir, same, ignore=shutil.ignore_patterns("chat", "completions"))
    done = cli(hub, "resume", str(run_dir), "--data", str(same), "--iters", "6", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert state_of(step_dir(run_dir, 6))["exact"] is True

    done = cli(hub, "resume", str(run_dir), "--data", str(other_data), "--accept-changed-data",
               "--iters", str(ITERS), "--no-progress")
    assert done.returncode == 0, done.stderr
    state = state_of(step_dir(run_dir, ITERS))
    assert state["exact"] is False
    assert len(state["changes"]) == 1 and state["changes"][0].startswith("data changed at iteration 6")
    from adamw_lm.model_card import model_card

    assert "Not an exact run" in str(model_card(step_dir(run_dir, ITERS), "alice/x", [ITERS]))


def test_data_named_by_a_hub_id_resumes_without_a_flag():
    from adamw_lm.fingerprint import changed_inputs, run_inputs

    first = run_inputs("/nonexistent/first-machine/model", "mlx-community/WikiSQL")
    assert first["data"] == {"id": "mlx-community/WikiSQL"}
    assert changed_inputs(first, run_inputs("/nonexistent/first-machine/model", "mlx-community/WikiSQL")) == {}
    assert "data" in changed_inputs(first, run_inputs("/nonexistent/first-machine/model", "org/other"))


def test_local_rotation_never_deletes_an_unpushed_checkpoint_and_training_goes_on(
        hub, tmp_path, tiny_model_path, data_dir, monkeypatch, caplog):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_runs, "Pusher", partial(Pusher, retries=1, backoff=0.01, max_backoff=0.02))
    repo = hub.repo_id("down")
    hub.server.fail("commit", "status", status=500, times=1000)  # the Hub is down for the whole run
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="adamw_lm.hub"):
        result = trainer.run(from_dict(config(tiny_model_path, data_dir, run_dir, hub={"repo_id": repo})),
                             progress=False)
    assert result.iteration == ITERS and not result.interrupted  # training went on
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("is not on the Hub" in w for w in warnings)
    # keep_last is 2, but none of the four checkpoints reached the Hub: all are still here.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        f"step-{s:07d}" for s in (2, 4, 6, 8)]

    hub.server.clear_faults()  # back up: `adamw-lm push` sends what was left
    assert hub_runs.push_run(run_dir, repo, progress=False) == []
    assert hub.server.files(repo)["checkpoints/latest"] == b"step-0000008\n"


def test_a_second_ctrl_c_leaves_pending_pushes_and_says_how_to_push_them(hub, tmp_path, capsys):
    pusher = Pusher(hub.repo_id("later"), endpoint=hub.url)
    pending = [tmp_path / "run" / "checkpoints" / "step-0000004"]

    def interrupted(progress: bool) -> list[Path]:
        raise KeyboardInterrupt

    pusher.wait = interrupted
    pusher.close = lambda: pending
    assert hub_runs.finish_pushing(pusher, tmp_path / "run") == pending
    err = capsys.readouterr().err
    assert "Not on the Hub: step-0000004" in err
    assert f"adamw-lm push {tmp_path / 'run'} --repo-id {pusher.repo_id} --step 4" in err


def test_rotation_spares_protected_folders(tmp_path, tiny_model_path):
    import mlx.nn as nn

    from adamw_lm import AdamW

    model = nn.Linear(4, 4)
    optimizer = AdamW(1e-3)
    saved = [checkpoint.save(tmp_path, s, model, optimizer, {"iteration": s}, {"fine_tune_type": "full"},
                             keep_last=1, protect={tmp_path / "checkpoints" / "step-0000001"})
             for s in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000003"]
    assert saved[-1].name == "step-0000003"


def test_hub_config_section_and_refused_token(tmp_path):
    cfg = from_dict({"hub": {"repo_id": "alice/run"}})
    assert (cfg.hub.private, cfg.hub.push_every, cfg.hub.branch, cfg.hub.keep_remote, cfg.hub.push_final) == (
        True, 1, "main", None, True)
    with pytest.raises(ConfigError, match="did you mean 'push_every'"):
        from_dict({"hub": {"push_evry": 2}})
    assert from_dict({"hub": {"keep_remote": 0}}).hub.keep_remote == 0  # keep every step folder
    with pytest.raises(ConfigError, match=r"'hub.keep_remote' must be >= 0 \(0 keeps all\) or null"):
        from_dict({"hub": {"keep_remote": -1}})
    with pytest.raises(ConfigError, match="'hub.push_every' must be >= 1"):
        from_dict({"hub": {"push_every": 0}})
    with pytest.raises(ConfigError, match="'hub.token'.*HF_TOKEN.*hf auth login"):
        load_config(write_yaml(tmp_path / "c.yaml", {"hub": {"repo_id": "alice/run", "token": "hf_x"}}))
    for bad in ("not a repo", "you/x@main", "hub:you/x"):
        with pytest.raises(ConfigError, match=r"'hub.repo_id': .* expected USER/REPO \(a branch goes in"):
            from_dict({"hub": {"repo_id": bad}})
        with pytest.raises(hub_module.HubError, match="is not a Hub repo id: expected USER/REPO"):
            Pusher(bad)


def test_ctrl_c_saves_pushes_that_checkpoint_and_exits_130(hub, tmp_path, tiny_model_path, data_dir):
    import signal
    import time

    repo = hub.repo_id("stopped")
    run_dir = tmp_path / "run"
    # No checkpoint falls due before the stop, and push_every would skip the stop's save: it is
    # pushed anyway (it is what another machine resumes from).
    cfg = write_yaml(tmp_path / "c.yaml", config(tiny_model_path, data_dir, run_dir, iters=10_000,
                                                 checkpoint={"every": 5000},
                                                 hub={"repo_id": repo, "push_every": 3}))
    env = {**os.environ, **hub.env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "adamw_lm.cli", "train", str(cfg), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.read_text().count("train_loss") < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped = checkpoint.latest_checkpoint(run_dir)
    assert stopped is not None and f"Pushed to {hub.url}/{repo}" in out
    assert hub.server.files(repo)["checkpoints/latest"] == f"{stopped.name}\n".encode()


def test_train_without_a_token_stops_before_training_and_leaves_no_run_folder(hub, tmp_path, tiny_model_path,
                                                                                data_dir):
    run_dir = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", config(tiny_model_path, data_dir, run_dir,
                                                 hub={"repo_id": hub.repo_id("nope")}))
    one_line_error(cli(hub, "train", str(cfg), "--no-progress", token=""), "no Hugging Face token",
                   "HF_TOKEN", "hf auth login")
    assert not run_dir.exists()
