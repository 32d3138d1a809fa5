"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """Return a path under the shared folder beside the repository, or skip the test."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} not found: the shared data and models beside the repository are absent"
        )
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep built-in teachers trained by tests in one cache for the session, not in ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "edgeopt-cache"
    monkeypatch.setenv("EDGEOPT_CACHE_DIR", str(cache))
