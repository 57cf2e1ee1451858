"""What the libraries may print on the user's console (``logging.verbose``).

Megatron-Core and PyTorch print a screenful at every start that says nothing about the run:
"Transformer Engine and Apex are not installed" (once per module that tries them), deprecation
notices ("GPTModel IS DEPRECATED"), torch's "No CUDA runtime is found", and, at INFO, their
set-up dumps. By default the entry points (pretrain, finetune, tools/evaluate.py,
tools/convert_to_hf.py) keep them off the console; ``logging.verbose=true`` (``--verbose`` for
the converter) shows them, Megatron's INFO messages included. Our own lines ([setup], [data],
step lines, [checkpoint], warnings of megatron_gpas.*) are never filtered.

Call ``configure`` before Megatron-Core is imported: most of its warnings are emitted at import.
"""

from __future__ import annotations

import logging
import warnings

# Python warnings raised from these packages' own code (megatron_gpas is not one of them), and
# torch.distributed's deprecation notices of collectives that Megatron-Core calls (they are raised
# from the wrapper module c10d_logger under TP/SP and the distributed optimizer).
_QUIET_WARNING_MODULES = r"(megatron|transformer_engine|apex|torch\.distributed\.c10d_logger)(\.|$)"
# Loggers whose warnings and INFO messages are library noise.
_QUIET_LOGGERS = ("megatron", "transformer_engine", "torch.utils.cpp_extension")
# Loggers whose INFO messages verbose mode shows (the root logger stays at WARNING).
_VERBOSE_LOGGERS = ("megatron",)

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure(verbose: bool) -> None:
    """Route library warnings and log messages: off the console unless ``verbose``."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    if verbose:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)  # undo an earlier quiet configure
        for name in _VERBOSE_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        warnings.filterwarnings("default", module=_QUIET_WARNING_MODULES)
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)  # errors still show
    warnings.filterwarnings("ignore", module=_QUIET_WARNING_MODULES)
