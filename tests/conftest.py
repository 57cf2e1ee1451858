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


@pytest.fixture(scope="module")
def megatron_env(request):
    """A gloo world of 1 and Megatron's parallel_state, once per module, for tests that build models
    directly (no Trainer). The config comes from the module's ``BASE_OVERRIDES``."""
    from megatron.core import parallel_state

    from megatron_gpas import distributed
    from megatron_gpas.config import load_config

    if parallel_state.model_parallel_is_initialized():  # left over by another module
        distributed.shutdown(keep_process_group=True)
    distributed.init_distributed(load_config(None, list(request.module.BASE_OVERRIDES)))
    yield
    distributed.shutdown(keep_process_group=True)
