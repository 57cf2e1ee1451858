"""``NormLayer``: Megatron's TransformerLayer with a pluggable normalization scheme and GPAS."""

from __future__ import annotations

from megatron.core.tensor_parallel import random as mc_random
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from megatron_gpas.config import Config
from megatron_gpas.model.gpas import GPASGate, fixed_gate_values
from megatron_gpas.model.init import init_stream
from megatron_gpas.model.schemes import get_scheme
from megatron_gpas.model.sublayer import ResidualAdd


def _checkpoint_without_output_needs_no_te() -> None:
    """Megatron-Core 0.19.2 sets ``CheckpointWithoutOutput.fp8 = fp8 is not None``, True for its
    default ``fp8=False``, and then asks Transformer Engine's FP8 state, which is not imported without
    TE: the selective ``layernorm`` recompute dies with a NameError. Without TE there is no FP8."""
    cls = mc_random.CheckpointWithoutOutput
    if mc_random.HAVE_TE or getattr(cls, "_fp8_off_without_te", False):
        return
    init = cls.__init__

    def init_without_fp8(self, fp8=False):
        init(self, fp8)
        self.fp8 = False

    cls.__init__ = init_without_fp8
    cls._fp8_off_without_te = True


_checkpoint_without_output_needs_no_te()


class NormLayer(TransformerLayer):
    """A TransformerLayer whose norms, residual adds and GPAS gate follow ``norm.scheme``.

    ``self.layer_number`` is global and 1-based under pipeline and virtual pipeline
    parallelism (Megatron adds the stage offset in ``TransformerLayer.__init__``). The whole
    layer, the scheme's own inits included, is built in the random stream of that number
    (model/init.py), so its initial weights do not depend on the layout.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, cfg: Config, **kwargs):
        # the global number Megatron is about to give the layer (checked below)
        number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        with init_stream(cfg.train.seed, "layer", number):
            self._build(config, submodules, layer_number, cfg, **kwargs)
        assert self.layer_number == number, f"layer {self.layer_number} was built in the stream of layer {number}"

    def _build(self, config, submodules, layer_number: int, cfg: Config, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        gpas = cfg.gpas
        self.gpas = None
        self.gpas_position = gpas.position
        if gpas.enabled:
            self.gpas = GPASGate(config, gpas.activation, gpas.init, per_sublayer=gpas.per_sublayer,
                                 stop_gradient=gpas.stop_gradient, learnable=not gpas.freeze,
                                 silu_beta=gpas.silu_beta)
            if gpas.fixed_values:
                values = fixed_gate_values(gpas.fixed_values, config.num_layers)[self.layer_number - 1]
                self.gpas.alpha.data.copy_(values.expand_as(self.gpas.alpha))
        self.self_attn_bda = ResidualAdd()
        self.mlp_bda = ResidualAdd()
        self.run_cfg = cfg  # the run's config, for the scheme's later work on this layer (e.g. buffers)
        self.scheme = get_scheme(cfg)
        self.scheme.configure_layer(self, cfg)
        self._check_norm_recompute()

    def _check_norm_recompute(self):
        """Megatron's selective ``layernorm`` recompute frees the norm slot's outputs after use. A
        deferred slot (Post-LN: the norm runs after the add) or an empty one (``identity``: SimpleNorm)
        is the identity, whose output is its input, the residual itself: nothing to recompute, and
        freeing it would destroy the residual.
        A slot that returns (normed, residual) would lose the residual the add needs (refused by
        validation; this guards other callers)."""
        for norm, flag in ((self.input_layernorm, "recompute_input_layernorm"),
                           (self.pre_mlp_layernorm, "recompute_pre_mlp_layernorm")):
            if not getattr(self, flag):
                continue
            if getattr(norm, "deferred", False) or getattr(norm, "identity", False):
                setattr(self, flag, False)
            elif getattr(norm, "gate_position", None) == "before_sublayer":
                raise ValueError(f"layer {self.layer_number}: layernorm recompute cannot keep the residual that "
                                 "the norm slot returns with gpas.position=before_sublayer")

    def sublayers(self):
        """(index, norm slot, residual slot) for attention (0) and MLP (1)."""
        return ((0, self.input_layernorm, self.self_attn_bda), (1, self.pre_mlp_layernorm, self.mlp_bda))
