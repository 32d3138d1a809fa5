"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep built-in teachers trained by tests in one cache for the session, not in ~/.cache.

    Session scope, so that module-scoped fixtures which train teachers use it too.
    """
    cache = tmp_path_factory.getbasetemp() / "edgeopt-cache"
    previous = os.environ.get("EDGEOPT_CACHE_DIR")
    os.environ["EDGEOPT_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("EDGEOPT_CACHE_DIR", None)
    else:
        os.environ["EDGEOPT_CACHE_DIR"] = previous
