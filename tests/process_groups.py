"""Megatron's parallel state between in-process Trainers of one test module."""

from megatron.core import parallel_state

from megatron_gpas import distributed


def release_parallel_state() -> None:
    """Tear Megatron's groups down if they are up; the default process group stays for the next Trainer."""
    if parallel_state.model_parallel_is_initialized():
        distributed.shutdown(keep_process_group=True)
