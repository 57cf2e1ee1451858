"""The ``Scheme`` interface: everything a normalization scheme changes, declared in one place.

A scheme is one object in the registry (``schemes/__init__.py``). The model builder, the
trainer, the optimizer, the checkpoint code and the exporter only ever call the methods below,
so adding a scheme is one module plus one registry entry. What a scheme can declare:

  structure   the norm module of each position (attention, MLP, final) and its options;
              ``configure_layer``: per built layer (global 1-based layer l known) the two slots
              around each sub-layer (``sublayer.py``: norm slot, residual add), inits, wiring;
              ``linear_modules``: the modules of the layer's linears (e.g. SimpleNorm's norm after
              each one, built on Megatron's parallel linears);
              ``core_attention``: the core attention module, given the backend's (nGPT's q/k scale);
              ``embedding_transform`` / ``head_transform``: modules after the embedding and
              before the LM head; ``logit_transform``: a module on the LM head's (vocab-parallel)
              output; ``residual_width``: the width of the residual stream
  init        ``transformer_config_overrides`` (Megatron's init stds), ``head_init_method``
  training    ``decays_all_parameters``: weight decay on norm weights and other 1-D parameters too;
              ``before_step``: periodic buffers (BHyT's c_attn);
              ``layer_scales``: the learned scales the telemetry logs per layer;
              ``unit_norm_axes``: weights kept unit-norm along an axis, at init (the builder) and
              after every optimizer step on the fp32 master weights (``after_optimizer_step``'s
              default, model/unit_norm.py; nGPT), or inside the unit ball (``unit_norm_clamp``; anGPT)
  checks      ``validate``: invalid combinations, before any process group;
              ``architecture``: the effective options a checkpoint must match
  layout      ``fusable_input_norm`` / ``te_final_norm``: whether Transformer Engine's fused
              LayerNorm-Linear and TENorm compute this scheme's norms
  export      ``export_plan``: a stock Llama (with the folds that make it one) or our HF class

Options of a scheme live under ``norm.options`` and are typed by the scheme's ``Options``
dataclass (unknown keys and wrong types are config errors naming the key).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from megatron.core.utils import unwrap_model

from megatron_gpas.config import Config, ConfigError, NormConfig, parse_section
from megatron_gpas.model.init import single_threaded
from megatron_gpas.model.norms import LayerNorm, RMSNorm
from megatron_gpas.model.unit_norm import project_unit_norm

if TYPE_CHECKING:
    from megatron_gpas.model.layer import NormLayer
    from megatron_gpas.model.sublayer import ResidualAdd, SublayerNorm

# Where GPAS goes on a pre-norm host (paper Table 4); "after_sublayer" is the paper's default.
PRE_NORM_GATE_SLOTS = {
    "after_sublayer": "after_add",  # x' = GPAS(x + f(LN(x)))
    "before_sublayer": "before_sublayer",  # y = GPAS(x); x' = y + f(LN(y))
    "after_norm": "after_norm",  # x' = x + f(GPAS(LN(x)))
    "after_branch": "after_branch",  # x' = x + GPAS(f(LN(x)))
}
GATE_POSITIONS = tuple(PRE_NORM_GATE_SLOTS)
NORM_POSITIONS = ("attention", "mlp", "final")
NORM_KINDS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
LLAMA_SCHEME = "pre"  # what a stock LlamaForCausalLM is (its import, and the default scheme)


def pre_norm(layer: "NormLayer", sublayer: int, norm: "SublayerNorm", residual: "ResidualAdd") -> None:
    """x' = x + f(LN(x)), GPAS where ``gpas.position`` says (default: after the add)."""
    slot = PRE_NORM_GATE_SLOTS[layer.gpas_position]
    target = norm if slot in ("before_sublayer", "after_norm") else residual
    target.attach_gate(layer.gpas, slot, sublayer)


def post_norm(layer: "NormLayer", sublayer: int, norm: "SublayerNorm", residual: "ResidualAdd") -> None:
    """x' = LN(x + f(x)); GPAS on the shortcut only, f sees the unscaled x (paper eqs. 7-8):
    x' = LN(GPAS(x) + f(x))."""
    residual.normalize_after_add(norm)
    residual.attach_gate(layer.gpas, "shortcut", sublayer)


@dataclasses.dataclass
class NoOptions:
    pass


@dataclasses.dataclass
class ExportPlan:
    """How ``tools/convert_to_hf.py`` writes a checkpoint of this scheme.

    llama_reason  None: the scheme has an exact stock-``LlamaForCausalLM`` form (after the folds
                  the exporter applies and checks: GPAS gates, norm factors, norm biases into
                  linear biases, transforms merged into the embedding and head); otherwise why
                  it has none (the export uses our HF class).
    hf_fields     fields of our HF class' config that describe this scheme's norms.
    centre_residual_writes  the network is blind to the mean of its residual stream (LayerNorm
                  before every read) or trained with that mean removed (Pre-(C)RMSNorm): the
                  exporter writes the embedding and output projections centred, so RMSNorm
                  computes LayerNorm exactly.

    norm_scales   a fixed multiplier of each layer's norm outputs (LNS' 1/√l), folded into the
                  norm weights of a stock Llama; None when there is none.
    tensor_factors  constants multiplied into layer tensors of our HF class (HF names within a
                  layer, e.g. anGPT's ν into the weights); the import divides them out.
    """

    llama_reason: str | None
    hf_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    centre_residual_writes: bool = False
    norm_scales: list[float] | None = None
    tensor_factors: dict[str, float] = dataclasses.field(default_factory=dict)


class Scheme:
    name: str = ""
    summary: str = ""  # the sub-layer equation, for the setup log and the docs
    Options: type = NoOptions
    pre_norm_host = True  # GPAS ablation positions are defined for pre-norm hosts only
    uses_norm_kind = False  # norm.kind chooses this scheme's norm module
    uses_norm_bias = False  # norm.bias gives its norms a bias
    default_bias = False  # what norm.bias=None means for such schemes
    gpas_refusal: str | None = None  # why GPAS has no meaningful placement here (gpas.enabled is refused)
    unit_norm_clamp = False  # the unit_norm_axes weights: norm 1 (False) or norm ≤ 1 (True) after each step

    # ------------------------------------------------------------------ options

    def options(self, norm: NormConfig):
        """``norm.options`` as this scheme's typed ``Options``."""
        return parse_section(self.Options, dict(norm.options), "norm.options")

    def norm_bias(self, norm: NormConfig) -> bool:
        return self.default_bias if norm.bias is None else norm.bias

    # ------------------------------------------------------------------ structure

    def norm_module(self, cfg: Config, position: str) -> tuple[type, dict]:
        """(norm class, extra constructor kwargs) for ``position`` (attention | mlp | final;
        branch for norms a scheme adds itself)."""
        kind = NORM_KINDS[cfg.norm.kind] if self.uses_norm_kind else RMSNorm
        return kind, ({"bias": self.norm_bias(cfg.norm)} if self.uses_norm_bias else {})

    def make_norm(self, cfg: Config, position: str, config, width: int | None = None) -> nn.Module:
        """A norm of ``position`` built outside Megatron's specs (e.g. Sandwich's branch norms)."""
        cls, kwargs = self.norm_module(cfg, position)
        return cls(config, width or config.hidden_size, cfg.norm.eps, **kwargs)

    def configure_layer(self, layer: "NormLayer", cfg: Config) -> None:
        raise NotImplementedError

    def linear_modules(self, cfg: Config, column_linear: type, row_linear: type) -> dict[str, type]:
        """The module of each linear slot of a layer (linear_qkv, linear_proj, linear_fc1, linear_fc2),
        given the backend's column- and row-parallel linear classes."""
        return {"linear_qkv": column_linear, "linear_proj": row_linear,
                "linear_fc1": column_linear, "linear_fc2": row_linear}

    def core_attention(self, cfg: Config, core_attention: type) -> type:
        """The core attention module, given the backend's (SDPA, Megatron's or TE's)."""
        return core_attention

    def embedding_transform(self, cfg: Config, config) -> nn.Module | None:
        return None

    def head_transform(self, cfg: Config, config) -> nn.Module | None:
        return None

    def logit_transform(self, cfg: Config, config, output_layer: nn.Module) -> nn.Module | None:
        """A module applied to the LM head's output (this rank's vocabulary shard of the logits)."""
        return None

    def residual_width(self, cfg: Config) -> int:
        return cfg.model.hidden_size

    def transformer_config_overrides(self, cfg: Config) -> dict:
        """Megatron ``TransformerConfig`` fields this scheme sets (e.g. its own init)."""
        return {}

    def head_init_method(self, cfg: Config) -> Callable[[torch.Tensor], Any] | None:
        """The LM head's init, applied to the whole (unsharded) weight; None: Megatron's init_method."""
        return None

    # ------------------------------------------------------------------ training

    def decays_all_parameters(self, cfg: Config) -> bool:
        """Weight decay on every parameter (GPAS gates excepted), instead of Megatron's rule that
        spares 1-D parameters (norm weights, scalars) and biases."""
        return False

    def before_step(self, model_chunks, step: int, cfg: Config) -> None:
        """Called by the trainer before every optimizer step ``step`` (0-based) of the run."""

    def layer_scales(self, layer) -> dict[str, torch.Tensor]:
        """The learned scales of a layer to watch (telemetry ``scales/{name}/layer_{l}``), each one
        number, the same on every TP rank: by default every one-element parameter of the two norm
        slots (DyT's α, BHyT's λ, OSP's SSNorm g)."""
        scales = {}
        for prefix, norm in (("attn_norm", layer.input_layernorm), ("mlp_norm", layer.pre_mlp_layernorm)):
            for name, param in norm.named_parameters():
                if param.numel() == 1:
                    scales[f"{prefix}.{name}"] = param.detach().reshape(())
        return scales

    def unit_norm_axes(self, model_chunk) -> dict:
        """{parameter: axis} of the chunk's weights kept unit-norm along ``axis`` (the reduced one);
        the same order on every rank of a data-parallel group."""
        return {}

    def after_optimizer_step(self, optimizer, model_chunks) -> None:
        """Called after every successful optimizer step: projects the ``unit_norm_axes`` weights
        (master and model copies) back to unit norm (into the unit ball with ``unit_norm_clamp``)."""
        axes = {param: axis for chunk in model_chunks for param, axis in self.unit_norm_axes(unwrap_model(chunk)).items()}
        project_unit_norm(optimizer, axes, clamp=self.unit_norm_clamp)

    # ------------------------------------------------------------------ checks and identity

    def validate(self, cfg: Config) -> None:
        """Raise ConfigError for combinations this scheme does not support."""
        opts = self.options(cfg.norm)  # unknown or mistyped options fail here
        if cfg.norm.kind not in NORM_KINDS:
            raise ConfigError(f"unknown norm.kind '{cfg.norm.kind}'. Known: {', '.join(NORM_KINDS)}")
        if not self.uses_norm_kind:
            if cfg.norm.kind != "rmsnorm":
                raise ConfigError(f"norm.kind={cfg.norm.kind} chooses the norm of the GPAS paper's hosts; "
                                  f"norm.scheme={self.name} has its own norm")
        if cfg.gpas.enabled and self.gpas_refusal is not None:
            raise ConfigError(f"gpas.enabled with norm.scheme={self.name}: {self.gpas_refusal}")
        if not self.uses_norm_bias and cfg.norm.bias is not None:
            raise ConfigError(f"norm.bias is not an option of norm.scheme={self.name}")
        self.check(cfg, opts)

    def check(self, cfg: Config, opts) -> None:
        """The scheme's own checks, with its parsed options."""

    def architecture(self, cfg: Config) -> dict:
        """The effective norm options that define the network (defaults resolved)."""
        norm = cfg.norm
        arch = {"norm.scheme": self.name, "norm.eps": norm.eps}
        if self.uses_norm_kind:
            arch["norm.kind"] = norm.kind
        if self.uses_norm_bias:
            arch["norm.bias"] = self.norm_bias(norm)
        for key, value in dataclasses.asdict(self.options(norm)).items():
            arch[f"norm.options.{key}"] = value
        return arch

    # ------------------------------------------------------------------ layout

    def fusable_input_norm(self, cfg: Config) -> bool:
        """Can Transformer Engine fuse the input norms into the following GEMM (LayerNorm-Linear)?"""
        return False

    def te_final_norm(self, cfg: Config) -> bool:
        """Is the final norm a plain RMSNorm/LayerNorm that TENorm computes?"""
        return False

    # ------------------------------------------------------------------ export

    def export_plan(self, cfg: Config) -> ExportPlan:
        return ExportPlan(llama_reason=f"norm.scheme={self.name} has no stock Llama form")

    def llama_import_norm(self, norm: dict) -> dict:
        """The norm section of a checkpoint imported from this scheme's stock-Llama export (its
        factors, gates and transforms are folded into the weights: a plain Pre-LN)."""
        return {**norm, "scheme": LLAMA_SCHEME, "kind": "rmsnorm", "bias": None, "options": {}}


@torch.no_grad()
def orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """A uniformly random orthogonal matrix, drawn from the default generator in fp32 (the
    builder runs a scheme's transforms in a random stream of their own, model/init.py). The QR
    runs on one thread: its bits depend on the thread count, and the values must not depend on
    the layout (torchrun gives each process one thread)."""
    values = torch.empty(weight.shape, dtype=torch.float32)
    rows, cols = values.shape
    flat = torch.randn(max(rows, cols), min(rows, cols))
    with single_threaded():
        q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    values.copy_(q if rows >= cols else q.T)
    weight.copy_(values.to(weight.device, weight.dtype))
    return weight
