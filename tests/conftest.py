"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global MLX random state: mlx seeds it from the clock, so a
    test that draws from it (a LoRA layer's initialization, say) would otherwise be a different
    test on every run (one such draw once took mlx_lm.fuse's float32 error past a tolerance)."""
    import mlx.core as mx

    mx.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "small" tiny Llama (seed 0), built once per session; treat it as read-only."""
    from adamw_lm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), size="small", seed=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's shipped data sets (text format; chat/ and completions/ below it)."""
    return REPO_ROOT / "recipes" / "data"


@dataclass(frozen=True)
class LocalHubSession:
    """The local Hub as one test sees it (see the ``hub`` fixture)."""

    server: Any  # tests/hub_server.LocalHub
    url: str
    token: str
    user: str
    cache: Path
    env: dict[str, str]  # for subprocesses: HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_XET

    def repo_id(self, name: str) -> str:
        """A repo name of this user that no other test uses."""
        return f"{self.user}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """A local Hugging Face Hub on 127.0.0.1 (tests/hub_server.py), one per session."""
    from hub_server import LocalHub

    server = LocalHub(tmp_path_factory.mktemp("hub_server")).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHubSession:
    """The local Hub with a write token of user ``alice`` in ``HF_TOKEN`` and a fresh HF_HOME.

    In this process pass ``endpoint=hub.url`` to the client (``HF_ENDPOINT`` is read when
    huggingface_hub is imported); subprocesses get ``hub.env``. A login cached on this machine is
    hidden, Xet is off (the local Hub speaks LFS), and faults of earlier tests are cleared.
    """
    import huggingface_hub.constants as hf_constants

    hub_server.clear_faults()
    home = tmp_path / "hf_home"
    token = hub_server.add_token("alice")
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(home), "HF_TOKEN": token,
           "HF_HUB_DISABLE_XET": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    return LocalHubSession(hub_server, hub_server.url, token, "alice", home / "hub", env)
