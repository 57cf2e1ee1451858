"""Fixtures shared by the test files that launch Trainer runs on the synthetic dataset."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request) -> Path:
    """A directory per test module, with ``data/`` for the synthetic dataset its launches write."""
    ws = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    (ws / "data").mkdir()
    return ws


@pytest.fixture(scope="module")
def parallel_state_released():
    """Megatron's groups torn down when the module ends (modules that build Trainers in-process
    use it through ``pytest.mark.usefixtures``); the default process group is kept."""
    yield
    from process_groups import release_parallel_state

    release_parallel_state()
