"""The normalization schemes, one module per family, and their registry.

Adding a scheme: a ``Scheme`` subclass (``base.py`` lists what it can declare) in its family's
module, plus its entry here. Nothing else in the package names a scheme.
"""

from __future__ import annotations

from megatron_gpas.config import Config
from megatron_gpas.model.schemes.angpt import ANGPT_SCHEMES
from megatron_gpas.model.schemes.base import GATE_POSITIONS, LLAMA_SCHEME, PRE_NORM_GATE_SLOTS, ExportPlan, Scheme
from megatron_gpas.model.schemes.bhyt import BHYT_SCHEMES
from megatron_gpas.model.schemes.dyt import DYT_SCHEMES
from megatron_gpas.model.schemes.ngpt import NGPT_SCHEMES
from megatron_gpas.model.schemes.osp import OSP_SCHEMES
from megatron_gpas.model.schemes.paper import PAPER_SCHEMES
from megatron_gpas.model.schemes.simplenorm import SIMPLENORM_SCHEMES
from megatron_gpas.model.schemes.zero_mean import ZERO_MEAN_SCHEMES

SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (*PAPER_SCHEMES, *ZERO_MEAN_SCHEMES, *OSP_SCHEMES, *DYT_SCHEMES, *BHYT_SCHEMES, *SIMPLENORM_SCHEMES,
               *NGPT_SCHEMES, *ANGPT_SCHEMES)
}


def get_scheme(cfg: Config) -> Scheme:
    return SCHEMES[cfg.norm.scheme]


__all__ = ["SCHEMES", "GATE_POSITIONS", "LLAMA_SCHEME", "PRE_NORM_GATE_SLOTS", "ExportPlan", "Scheme", "get_scheme"]
