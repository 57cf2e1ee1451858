"""``NormLayer``: Megatron's TransformerLayer with a pluggable normalization scheme and GPAS."""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_gpas.config import GPASConfig
from megatron_gpas.model.gpas import GPASGate
from megatron_gpas.model.schemes import SCHEMES


class NormLayer(TransformerLayer):
    """A TransformerLayer whose residual adds (and, per scheme, norms) follow ``scheme``.

    ``self.layer_number`` is global and 1-based under pipeline and virtual pipeline
    parallelism (Megatron adds the stage offset in ``TransformerLayer.__init__``).
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, scheme: str,
                 gpas: GPASConfig, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.scheme = SCHEMES[scheme]
        self.gpas = GPASGate(config, gpas.activation, gpas.init) if gpas.enabled else None
        self.scheme.configure(self)
