"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "small" tiny Llama (seed 0), built once per session; treat it as read-only."""
    from adamw_lm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), size="small", seed=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's shipped data sets (text format; chat/ and completions/ below it)."""
    return REPO_ROOT / "recipes" / "data"
