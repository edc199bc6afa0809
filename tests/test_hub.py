"""adamw_lm.hub against the local Hub (tests/hub_server.py) with the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx2
import mlx.core as mx
import pytest
from huggingface_hub import HfApi, ModelCard, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from mlx.utils import tree_flatten

from adamw_lm import AdamW, checkpoint
from adamw_lm.hub import HubAuthError, HubError, HubNotFoundError, Pusher, list_remote, pull
from adamw_lm.model_card import loss_plot, model_card
from helpers.training import LORA, lm_steps, lora_model

STEPS = (10, 20, 30, 40)
# Fast retries for the tests; the defaults wait seconds.
FAST = {"retries": 3, "backoff": 0.02, "max_backoff": 0.1}


def make_optimizer() -> AdamW:
    return AdamW(1e-2, state_precision="int8", min_quantize_size=0, seed=3)


@pytest.fixture(scope="session")
def run_dir(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints at STEPS, saved by checkpoint.save; treat it as read-only."""
    folder = tmp_path_factory.mktemp("hub_run")
    model, optimizer = lora_model(tiny_model_path), make_optimizer()

    losses: list[float] = []
    config = {"model": str(tiny_model_path), "data": str(folder / "data"), "fine_tune_type": "lora",
              "num_layers": 2, "lora_parameters": LORA, "learning_rate": 0.01, "iters": 40,
              "optimizer": {"state_precision": "int8"}, "checkpoint": {"dir": str(folder)}}
    for step in STEPS:
        losses += lm_steps(model, optimizer, step - len(losses), first=len(losses))
        state = {"iteration": step, "epoch": 0, "offset": step * 2, "losses": list(losses),
                 "val_losses": [[s, 5.0 - s / 100] for s in STEPS if s <= step], "seed": 0,
                 "config": config}
        adapter_config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA,
                          "model": str(tiny_model_path)}
        checkpoint.save(folder, step, model, optimizer, state, adapter_config,
                        val_loss=5.0 - step / 100)
    return folder


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def pusher(hub_session, repo_id: str, **options) -> Pusher:
    return Pusher(repo_id, endpoint=hub_session.url, **{**FAST, **options})


def push_all(p: Pusher, run_dir: Path, steps=STEPS) -> list[Path]:
    for step in steps:
        assert p.submit(step_dir(run_dir, step))
    return p.wait(progress=False)


def remote_steps(hub_session, repo_id: str, revision: str = "main") -> list[str]:
    files = hub_session.server.files(repo_id, revision)
    return sorted({p.split("/")[1] for p in files if p.startswith("checkpoints/step-")})


def test_push_then_pull_gives_the_same_folder_and_it_loads(hub, run_dir, tiny_model_path):
    repo = hub.repo_id("run")
    p = pusher(hub, repo)
    assert push_all(p, run_dir) == []
    assert [f for f, _ in p.pushed] == [step_dir(run_dir, s) for s in STEPS]

    files = hub.server.files(repo)
    latest = step_dir(run_dir, STEPS[-1])
    assert files["checkpoints/latest"] == b"step-0000040\n"
    assert files["adapters.safetensors"] == (latest / "adapters.safetensors").read_bytes()
    assert files["adapter_config.json"] == (latest / "adapter_config.json").read_bytes()
    assert "README.md" in files
    # safetensors went through the LFS batch API and a PUT, as on the real Hub.
    assert hub.server.requests("lfs_batch") and hub.server.requests("lfs_upload")

    folder = pull(repo, endpoint=hub.url)
    assert folder.name == "step-0000040"
    assert sorted(f.name for f in folder.iterdir()) == sorted(f.name for f in latest.iterdir())
    for f in latest.iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes(), f.name
        # snapshot_download links each file to a blob of the Hugging Face cache
        assert (folder / f.name).is_symlink()
        assert (folder / f.name).resolve().is_relative_to(hub.cache.resolve())
    assert checkpoint.verify(folder)["step"] == 40

    model, optimizer = lora_model(tiny_model_path), make_optimizer()
    state = checkpoint.load(folder, model, optimizer)
    assert state["iteration"] == 40
    original, _ = lora_model(tiny_model_path), make_optimizer()
    original.load_weights(str(latest / "adapters.safetensors"), strict=False)
    for (key, a), (_, b) in zip(tree_flatten(model.trainable_parameters()),
                                tree_flatten(original.trainable_parameters()), strict=True):
        assert mx.array_equal(a, b).item(), key


def test_files_above_the_lfs_threshold_go_through_lfs_whatever_their_type(hub, run_dir, tmp_path):
    from hub_server import LocalHub

    small_lfs = LocalHub(tmp_path / "server", lfs_threshold=512).start()
    try:
        small_lfs.tokens[hub.token] = (hub.user, True)
        repo = f"{hub.user}/lfs-threshold"
        p = Pusher(repo, endpoint=small_lfs.url, **FAST)
        assert push_all(p, run_dir, steps=(10,)) == []
        state = step_dir(run_dir, 10) / "trainer_state.json"
        assert state.stat().st_size > 512
        commit = small_lfs.history(repo)[0]
        assert commit.files["checkpoints/step-0000010/trainer_state.json"].lfs
        assert not commit.files["checkpoints/latest"].lfs
        folder = pull(repo, endpoint=small_lfs.url)
        assert (folder / "trainer_state.json").read_bytes() == state.read_bytes()
        assert checkpoint.verify(folder)["step"] == 10
    finally:
        small_lfs.stop()


def test_pushes_go_in_order_one_commit_each_and_an_idle_pusher_holds_no_thread(hub, run_dir):
    repo = hub.repo_id("order")
    push_all(pusher(hub, repo), run_dir)
    titles = [c.title for c in reversed(hub.server.history(repo))]
    assert titles == ["initial commit"] + [f"adamw-lm: checkpoint step-{s:07d}" for s in STEPS]
    workers = [t for t in threading.enumerate() if t.name == f"adamw-lm-hub-push {repo}"]
    for t in workers:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in workers)


def test_remote_rotation_deletes_old_steps_in_the_same_commit(hub, run_dir):
    repo = hub.repo_id("rotate")
    push_all(pusher(hub, repo, keep_remote=2), run_dir)
    assert remote_steps(hub, repo) == ["step-0000030", "step-0000040"]
    history = hub.server.history(repo)  # newest first
    assert len(history) == 1 + len(STEPS)  # no separate delete commits
    # The commit that added step 30 removed step 10, and nothing in between saw 3 folders.
    for commit in history:
        steps = {p.split("/")[1] for p in commit.files if p.startswith("checkpoints/step-")}
        assert len(steps) <= 2
    assert {p.split("/")[1] for p in history[1].files if "/step-" in p} == {
        "step-0000020", "step-0000030"}


def test_background_push_leaves_the_caller_free_and_pins_until_pushed(hub, run_dir):
    repo = hub.repo_id("slow")
    p = pusher(hub, repo)
    p.prepare()
    hub.server.fail("commit", "slow", delay=1.0)
    folder = step_dir(run_dir, 10)
    tic = time.perf_counter()
    assert p.submit(folder)
    assert time.perf_counter() - tic < 0.2  # the caller goes on at once
    assert p.pinned() == {folder}
    busy = sum(i * i for i in range(200_000))  # the caller's own work meanwhile
    assert busy > 0 and p.pinned() == {folder}
    assert p.wait(progress=False) == []
    assert p.pinned() == set()
    assert remote_steps(hub, repo) == ["step-0000010"]


def test_push_every_and_push_final(hub, run_dir):
    repo = hub.repo_id("every")
    p = pusher(hub, repo, push_every=2)
    chosen = [p.submit(step_dir(run_dir, s), final=s == 30) for s in STEPS[:3]]
    assert chosen == [False, True, True]  # 10 skipped, 20 is the 2nd, 30 is final
    assert p.wait(progress=False) == []
    assert remote_steps(hub, repo) == ["step-0000020", "step-0000030"]


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 500, "times": 2},
        {"kind": "status", "status": 503, "times": 1},
        {"kind": "drop", "times": 1},  # the connection closes mid-commit, nothing applied
        {"kind": "drop", "apply": True, "times": 1},  # applied, but the answer is lost
    ],
    ids=["500x2", "503", "dropped", "answer-lost"],
)
def test_commit_faults_are_retried_without_duplicates(hub, run_dir, fault):
    repo = hub.repo_id("faults")
    p = pusher(hub, repo)
    p.prepare()
    hub.server.fail("commit", **fault)
    assert push_all(p, run_dir, steps=(10,)) == []
    assert remote_steps(hub, repo) == ["step-0000010"]
    assert len(hub.server.requests("commit")) >= fault["times"] + 1
    added = [c for c in hub.server.history(repo) if c.title.endswith("step-0000010")]
    assert len(added) == 1


def test_429_retry_after_is_honoured(hub, run_dir):
    repo = hub.repo_id("ratelimit")
    p = pusher(hub, repo)
    p.prepare()
    hub.server.fail("commit", "status", status=429, retry_after=1)
    assert push_all(p, run_dir, steps=(10,)) == []
    commits = [r for r in hub.server.requests("commit") if r.path.startswith(f"/api/models/{repo}")]
    assert [r.status for r in commits] == [429, 200]
    assert commits[1].time - commits[0].time >= 1.0  # our back-off is 0.1 s at most


def test_faults_in_preupload_and_lfs_upload_are_retried(hub, run_dir):
    repo = hub.repo_id("lfs-faults")
    p = pusher(hub, repo)
    p.prepare()
    before = len(hub.server.requests("lfs_upload"))
    hub.server.fail("preupload", "status", status=502)
    hub.server.fail("lfs_upload", "drop")
    assert push_all(p, run_dir, steps=(10,)) == []
    assert remote_steps(hub, repo) == ["step-0000010"]
    statuses = [r.status for r in hub.server.requests("lfs_upload")[before:]]
    # adapters + optimizer state; the top-level adapters are the same bytes, not sent again
    assert None in statuses and statuses.count(200) == 2


def test_a_timed_out_commit_is_retried(hub, run_dir):
    repo = hub.repo_id("timeout")
    p = pusher(hub, repo)
    p.prepare()

    # A client with a short read timeout, as a user can configure; the server answers late.
    def short_timeouts() -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [hf_request_event_hook]},
                             follow_redirects=True, timeout=0.5)

    set_client_factory(short_timeouts)
    try:
        hub.server.fail("commit", "slow", delay=1.5)
        assert push_all(p, run_dir, steps=(10,)) == []
    finally:
        set_client_factory(default_client_factory)
    time.sleep(1.2)  # the late first commit lands on a moved head and is refused (412)
    titles = [c.title for c in hub.server.history(repo)]
    assert titles.count("adamw-lm: checkpoint step-0000010") == 1
    assert remote_steps(hub, repo) == ["step-0000010"]


def test_exhausted_retries_warn_keep_pinned_and_the_next_push_carries_it(hub, run_dir, caplog):
    repo = hub.repo_id("carry")
    p = pusher(hub, repo)
    p.prepare()
    first, second = step_dir(run_dir, 10), step_dir(run_dir, 20)
    hub.server.fail("commit", "status", status=500, times=FAST["retries"] + 1)
    with caplog.at_level(logging.WARNING, logger="adamw_lm.hub"):
        p.submit(first)
        assert p.wait(progress=False, retry_failed=False) == [first]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(first) in warnings[0] and "not on the Hub" in warnings[0]
    assert p.pinned() == {first} and p.unpushed() == [first]
    assert remote_steps(hub, repo) == []

    p.submit(second)
    assert p.wait(progress=False) == []
    assert remote_steps(hub, repo) == ["step-0000010", "step-0000020"]
    last = hub.server.history(repo)[0]
    assert last.title == "adamw-lm: checkpoint step-0000020"
    assert "step-0000010" in last.message  # carried in the same commit


def test_wait_retries_failed_pushes_once_more(hub, run_dir):
    repo = hub.repo_id("flush")
    p = pusher(hub, repo)
    p.prepare()
    hub.server.fail("commit", "status", status=500, times=FAST["retries"] + 1)
    p.submit(step_dir(run_dir, 10))
    assert p.wait(progress=False, retry_failed=False) == [step_dir(run_dir, 10)]
    assert p.wait(progress=False) == []
    assert remote_steps(hub, repo) == ["step-0000010"]


def test_a_folder_that_is_not_a_checkpoint_is_dropped_not_carried(hub, run_dir, tmp_path, caplog):
    repo = hub.repo_id("dropped")
    p = pusher(hub, repo)
    with caplog.at_level(logging.WARNING, logger="adamw_lm.hub"):
        p.submit(tmp_path / "step-0000005")  # gone before its push
        p.submit(tmp_path)  # not a checkpoint folder
        p.submit(step_dir(run_dir, 10))
        assert p.wait(progress=False) == []
    assert caplog.text.count("not pushing") == 2
    assert remote_steps(hub, repo) == ["step-0000010"]


def test_close_leaves_pending_pushes_and_returns_them(hub, run_dir):
    repo = hub.repo_id("close")
    p = pusher(hub, repo)
    p.prepare()
    hub.server.fail("commit", "slow", delay=1.0)
    folders = [step_dir(run_dir, s) for s in (10, 20, 30)]
    for f in folders:
        p.submit(f)
    time.sleep(0.3)
    assert p.close() == folders
    with pytest.raises(HubError, match="after close"):
        p.submit(step_dir(run_dir, 40))
    time.sleep(1.2)
    assert remote_steps(hub, repo) in ([], ["step-0000010"])  # only the one in flight, if any


def test_pull_at_an_older_revision_branch_tag_and_step(hub, run_dir):
    repo = hub.repo_id("revisions")
    p = pusher(hub, repo, keep_remote=1)
    push_all(p, run_dir, steps=(10,))
    first_sha = hub.server.head(repo)
    HfApi(endpoint=hub.url).create_tag(repo, tag="v10", revision=first_sha)
    push_all(p, run_dir, steps=(20, 30))
    assert remote_steps(hub, repo) == ["step-0000030"]
    push_all(pusher(hub, repo, branch="exp"), run_dir, steps=(40,))

    assert pull(repo, endpoint=hub.url).name == "step-0000030"
    assert pull(f"hub:{repo}@{first_sha}", endpoint=hub.url).name == "step-0000010"
    assert pull(f"{repo}@v10", endpoint=hub.url).name == "step-0000010"
    branch = pull(f"{repo}@exp", endpoint=hub.url)
    assert branch.name == "step-0000040" and checkpoint.verify(branch)["step"] == 40
    assert pull(f"{repo}@exp", 30, endpoint=hub.url).name == "step-0000030"
    with pytest.raises(HubNotFoundError, match=r"no checkpoint for step 20; it has steps 30$"):
        pull(repo, 20, endpoint=hub.url)


def test_pull_errors_are_one_clear_line(hub, run_dir, monkeypatch):
    repo = hub.repo_id("errors")
    push_all(pusher(hub, repo), run_dir, steps=(10,))
    cases = [
        (f"{hub.user}/no-such-repo", HubNotFoundError, "not found, or private"),
        (f"{repo}@no-such-branch", HubNotFoundError, "revision not found"),
        (f"{repo}@{'0' * 40}", HubNotFoundError, "revision not found"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message) as info:
            pull(spec, endpoint=hub.url)
        assert "\n" not in str(info.value) and spec.split("@")[0] in str(info.value)
    empty = hub.repo_id("empty")
    HfApi(endpoint=hub.url).create_repo(empty, private=True)
    with pytest.raises(HubNotFoundError, match="has no checkpoints"):
        pull(empty, endpoint=hub.url)
    for bad in ("alice", "alice/run@", "hub:../x", "a/b/c"):
        with pytest.raises(HubError, match="is not a Hub run"):
            pull(bad, endpoint=hub.url)

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubNotFoundError, match="set HF_TOKEN or run `hf auth login`"):
        pull(repo, endpoint=hub.url)  # private: without a token it looks missing, as on the Hub
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    with pytest.raises(HubAuthError, match="refused the token"):
        pull(repo, endpoint=hub.url)


def test_no_token_or_no_write_access_fails_before_training(hub, monkeypatch):
    repo = hub.repo_id("auth")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="no Hugging Face token .* set HF_TOKEN"):
        pusher(hub, repo).prepare()
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")  # the server answers 401
    with pytest.raises(HubAuthError, match=r"refused the token for .* \(401\)"):
        pusher(hub, repo).prepare()
    monkeypatch.setenv("HF_TOKEN", hub.token)
    pusher(hub, repo).prepare()
    monkeypatch.setenv("HF_TOKEN", hub.server.add_token("bob"))
    with pytest.raises(HubAuthError, match="no write access .* --repo-id"):
        pusher(hub, repo).prepare()
    monkeypatch.setenv("HF_TOKEN", hub.server.add_token("alice", write=False))
    with pytest.raises(HubAuthError, match="no write access"):
        pusher(hub, repo).prepare()


def test_pushing_into_an_existing_public_repo_warns(hub, caplog):
    public, private = hub.repo_id("public"), hub.repo_id("private")
    HfApi(endpoint=hub.url).create_repo(public, private=False)
    with caplog.at_level(logging.WARNING, logger="adamw_lm.hub"):
        pusher(hub, private).prepare()
        assert caplog.text == ""
        pusher(hub, public).prepare()
    assert f"Hub repo {public} exists and is public" in caplog.text
    assert hub.server.repos[private].private and not hub.server.repos[public].private


def test_a_file_tampered_on_the_hub_is_caught(hub, run_dir):
    repo = hub.repo_id("tampered")
    push_all(pusher(hub, repo), run_dir, steps=(10,))
    name = "checkpoints/step-0000010/optimizer.safetensors"
    data = bytearray(hub.server.files(repo)[name])
    data[-1] ^= 0xFF  # same size, other bytes
    hub.server.commit_files(repo, {name: bytes(data)})
    folder = pull(repo, endpoint=hub.url)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="optimizer.safetensors"):
        checkpoint.verify(folder)

    hub.server.commit_files(repo, {name: bytes(data) + b"more"})
    with pytest.raises(HubError, match=r"optimizer.safetensors is \d+ bytes, its manifest.json"):
        pull(repo, endpoint=hub.url)


def test_a_manifest_that_names_a_pattern_or_is_not_json_downloads_nothing(hub, run_dir):
    repo = hub.repo_id("pattern")
    push_all(pusher(hub, repo), run_dir, steps=(10,))
    prefix = "checkpoints/step-0000010"
    manifest = json.loads(hub.server.files(repo)[f"{prefix}/manifest.json"])
    manifest["files"]["*"] = {"size": 4, "sha256": "0" * 64}
    hub.server.commit_files(repo, {f"{prefix}/manifest.json": json.dumps(manifest).encode(),
                                   f"{prefix}/*": b"glob", f"{prefix}/huge.bin": b"x" * 1000})
    with pytest.raises(HubError, match="a listed file name is not a plain file name"):
        pull(repo, endpoint=hub.url)
    assert not hub.cache.exists() or not list(hub.cache.rglob("huge.bin"))
    # Not a manifest of this package, listing many files: refused before any is downloaded.
    many = {f"f{i}": {"size": 1000, "sha256": "0" * 64} for i in range(200)}
    hub.server.commit_files(repo, {f"{prefix}/manifest.json": json.dumps(
        {"format": "other", "files": many}).encode(), **{f"{prefix}/f{i}": b"x" * 1000 for i in range(200)}})
    with pytest.raises(HubError, match="expected format"):
        pull(repo, endpoint=hub.url)
    assert not hub.cache.exists() or not list(hub.cache.rglob("f1*"))

    for bad, problem in ((b"[" * 5000 + b"]" * 5000, "nested deeper"),
                         (b'{"files": NaN}', "NaN"), (b"\xff", "not UTF-8")):
        hub.server.commit_files(repo, {f"{prefix}/manifest.json": bad})
        with pytest.raises(checkpoint.CorruptCheckpointError, match=problem) as error:
            pull(repo, endpoint=hub.url)
        assert f"{prefix}/manifest.json on {repo}" in str(error.value)


def test_a_repo_listing_too_many_files_is_refused(hub, run_dir, monkeypatch):
    import adamw_lm.hub as hub_module

    repo = hub.repo_id("crowded")
    push_all(pusher(hub, repo), run_dir, steps=(10,))
    monkeypatch.setattr(hub_module, "MAX_REMOTE_FILES", 3)  # a real run's limit is 100000 files
    with pytest.raises(HubError, match="more than 3 files under checkpoints/"):
        pull(repo, endpoint=hub.url)

def test_a_latest_or_card_that_lies_is_not_believed(hub, run_dir, caplog):
    repo = hub.repo_id("liar")
    push_all(pusher(hub, repo), run_dir, steps=(10, 20))
    for lie in (b"step-0009999\n", b"../../../etc/passwd\n", b"step-0000020" + b" " * 100):
        card = b"---\nlibrary_name: mlx\n---\nlatest: step 9999\n"
        hub.server.commit_files(repo, {"checkpoints/latest": lie, "README.md": card})
        with caplog.at_level(logging.WARNING, logger="adamw_lm.hub"):
            caplog.clear()
            assert pull(repo, endpoint=hub.url).name == "step-0000020"
        assert "does not name one of its checkpoints" in caplog.text
        assert b"passwd" not in caplog.text.encode()


def test_list_remote_reports_steps_losses_and_latest(hub, run_dir):
    repo = hub.repo_id("listing")
    push_all(pusher(hub, repo, keep_remote=3), run_dir)
    found = list_remote(repo, endpoint=hub.url)
    assert [c.step for c in found] == [40, 30, 20]
    assert [c.latest for c in found] == [True, False, False]
    assert [c.val_loss for c in found] == [pytest.approx(5.0 - s / 100) for s in (40, 30, 20)]
    for c in found:
        state = checkpoint.verify(step_dir(run_dir, c.step))
        assert c.size == sum(r["size"] for r in state["files"].values()) + (
            step_dir(run_dir, c.step) / "manifest.json").stat().st_size
        assert c.train_loss is not None and c.path == f"checkpoints/step-{c.step:07d}"


def test_list_remote_reads_a_bounded_number_of_steps(hub, run_dir, monkeypatch):
    """A repo of many steps: only the newest few (and a bounded number of bytes) are downloaded;
    the others are listed with their size alone."""
    import adamw_lm.hub as hub_module

    repo = hub.repo_id("many")
    push_all(pusher(hub, repo), run_dir)
    monkeypatch.setattr(hub_module, "MAX_DETAILED_STEPS", 2)
    found = list_remote(repo, endpoint=hub.url, cache_dir=hub.cache / "few")
    assert [c.step for c in found] == [40, 30, 20, 10]
    assert [c.val_loss is not None for c in found] == [True, True, False, False]
    assert all(c.size > 0 for c in found)
    downloaded = sorted("/".join(p.parts[-2:]) for p in (hub.cache / "few").rglob("*")
                        if "snapshots" in p.parts and not p.is_dir())  # fmt: skip
    assert downloaded == ["checkpoints/latest", *(f"step-00000{s}0/{name}" for s in (3, 4)
                                                 for name in ("manifest.json", "trainer_state.json"))]
    monkeypatch.setattr(hub_module, "MAX_DETAIL_BYTES", 0)
    found = list_remote(repo, endpoint=hub.url, cache_dir=hub.cache / "none")
    assert [c.val_loss for c in found] == [None] * 4


def test_model_card(hub, run_dir, tiny_model_path):
    repo = hub.repo_id("card")
    push_all(pusher(hub, repo, keep_remote=2, branch="exp"), run_dir)
    text = hub.server.files(repo, "exp")["README.md"].decode()
    card = ModelCard(text)
    assert card.data.library_name == "mlx"
    assert set(card.data.tags) == {"mlx", "adamw-lm", "lora"}
    assert card.data.base_model is None  # the base model was a local folder
    assert f"adamw-lm resume hub:{repo}@exp" in text
    assert "| 30 |" in text and "| 40 |" in text and "| 10 |" not in text
    assert "4.6000" in text and "4.7000" in text  # val losses of steps 40 and 30
    state = (step_dir(run_dir, 40) / "optimizer.safetensors").stat().st_size
    assert f"moments in int8 x 28 parameters; optimizer state {state / 1024:.1f} KiB" in text
    assert "learning_rate: 0.01" in text  # the recipe
    assert str(tiny_model_path) not in text and str(run_dir) not in text  # no local paths
    plot = hub.server.files(repo, "exp")["loss.png"]
    assert plot.startswith(b"\x89PNG\r\n\x1a\n")
    assert "![training and validation loss](loss.png)" in text


def test_model_card_names_a_hub_base_model(run_dir, tmp_path):
    folder = tmp_path / "step-0000010"
    shutil.copytree(step_dir(run_dir, 10), folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    state["config"]["model"] = "mlx-community/Qwen3-0.6B-4bit"
    (folder / "trainer_state.json").write_text(json.dumps(state))
    card = model_card(folder, "alice/run", [10])
    assert loss_plot(folder) is not None
    assert card.data.base_model == "mlx-community/Qwen3-0.6B-4bit"
    assert "mlx_lm.generate --model mlx-community/Qwen3-0.6B-4bit" in card.text
    assert "adamw-lm resume hub:alice/run\n" in card.text
    assert "loss.png" not in card.text  # no plot was named

    state["losses"] = []  # e.g. the trainer callback, which records reported losses only
    (folder / "trainer_state.json").write_text(json.dumps(state))
    assert loss_plot(folder) is None


def test_no_token_is_pushed_or_stored(hub, run_dir):
    repo = hub.repo_id("secret")
    push_all(pusher(hub, repo), run_dir, steps=(10, 20))
    pull(repo, endpoint=hub.url)
    token = hub.token.encode()
    assert token not in hub.server.stored_bytes()
    for root in (run_dir, hub.cache):
        for f in root.rglob("*"):
            if f.is_file():
                assert token not in f.read_bytes(), f
    assert all(r.authorized for r in hub.server.requests("commit"))
