"""BHyT, Bounded Hyperbolic Tangent (MLAI-Yonsei, ICML 2026; methods.md §5.1).

    BHyT(x; m) = γ ⊙ tanh(λ · x / (κ·sqrt(m + ε))),  λ one scalar per norm, κ = 10
    h  = x + Attn(BHyT₁(x; mean(x²)))                              exact statistics
    x' = h + MLP(BHyT₂(h; mean(x²) + c_attn·λ₁²/κ²))               ``bhyt``: estimated, no 2nd reduction
    x' = h + MLP(BHyT₂(h; mean(h²)))                               ``bhytstar``: exact
    c_attn = ‖W_Vᵀ·W_Oᵀ‖²_F / (T·d)   (W_V expanded to one value head per query head under GQA)
    final norm: RMSNorm when λ_final = 0 (the paper's setting), else BHyT with exact statistics

The gradient flows through mean(x²) of the estimate; λ₁ and c_attn enter it as constants.
c_attn is a per-layer buffer computed from the current weights before steps 0, N, 2N, ...
(N = ``refresh_interval``, BHyT's max(1, min(1000, steps/50)) by default), so also at the start
of every new run from loaded weights; it is saved with the checkpoint, so a resume continues
bitwise. Under tensor parallelism W_V's heads and W_O's columns are sharded: the [d, d] product
W_O·W_V is a sum of per-rank products, all-reduced before its norm.

With GPAS after the attention add, the post-attention norm's input is (1 − act(α))·h, so the
estimate is scaled by (1 − act(α))² (the gate's value, as a constant like λ₁).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_gpas.config import ConfigError
from megatron_gpas.model.norms import BoundedTanh, RMSNorm
from megatron_gpas.model.schemes.base import NORM_POSITIONS, ExportPlan, Scheme, pre_norm


@dataclasses.dataclass
class BHyTOptions:
    lambdas: list[float] = dataclasses.field(default_factory=lambda: [2.0, 1.0, 0.0])  # input, post-attention, final
    kappa: float = 10.0
    learnable_lambda: bool = True  # λ₁, λ₂ learned (every shipped BHyT config); the final λ always is
    refresh_interval: int | None = None  # steps between c_attn refreshes; None = max(1, min(1000, train.steps // 50))
    seq_length: int | None = None  # T in c_attn; None = train.seq_length


@torch.no_grad()
def value_output_gain(layer) -> torch.Tensor:
    """‖W_O·W_V‖²_F of a layer (fp32), W_V with one value head per query head, summed over TP."""
    c = layer.config
    groups = c.num_query_groups or c.num_attention_heads
    q_per_group = c.num_attention_heads // groups
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    # While the model is built, its weights are still on the CPU (model/init.py): compute on the
    # GPU when there is one (NCCL reduces CUDA tensors only, and it is faster).
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # Megatron's fused QKV rows: per local query group [q heads ..., k, v], head_dim rows each.
    qkv = layer.self_attention.linear_qkv.weight.detach().to(device, torch.float32)
    values = qkv.view(groups // tp, q_per_group + 2, c.kv_channels, -1)[:, q_per_group + 1]
    per_head = values.repeat_interleave(q_per_group, dim=0).reshape(-1, qkv.shape[-1])
    proj = layer.self_attention.linear_proj.weight.detach().to(device, torch.float32)
    product = proj @ per_head  # [d, d], this rank's heads
    if tp > 1:
        dist.all_reduce(product, group=tp_group)
    return product.pow(2).sum()


class BHyT(Scheme):
    Options = BHyTOptions
    exact = False

    def __init__(self, name: str, exact: bool):
        self.name, self.exact = name, exact
        self.summary = ("x' = h + f(BHyT(h; mean(h²))), h = x + Attn(BHyT(x; mean(x²)))" if exact else
                        "x' = h + f(BHyT(h; mean(x²) + c_attn·λ₁²/κ²)), h = x + Attn(BHyT(x; mean(x²)))")

    def check(self, cfg, opts):
        if len(opts.lambdas) != 3 or min(opts.lambdas[:2]) <= 0 or opts.lambdas[2] < 0:
            raise ConfigError(f"norm.options.lambdas must be [input > 0, post-attention > 0, final >= 0] "
                              f"(final 0 = RMSNorm), got {opts.lambdas}")
        if opts.kappa <= 0:
            raise ConfigError(f"norm.options.kappa must be positive, got {opts.kappa}")
        if opts.refresh_interval is not None and opts.refresh_interval < 1:
            raise ConfigError(f"norm.options.refresh_interval must be >= 1, got {opts.refresh_interval}")
        if opts.seq_length is not None and opts.seq_length < 1:
            raise ConfigError(f"norm.options.seq_length must be >= 1, got {opts.seq_length}")
        if not self.exact and cfg.gpas.enabled and cfg.gpas.position not in ("after_sublayer", "before_sublayer"):
            raise ConfigError(
                f"norm.scheme=bhyt estimates the post-attention statistics from the layer input, which "
                f"gpas.position={cfg.gpas.position} changes inside the attention branch; use "
                "gpas.position=after_sublayer or before_sublayer, or norm.scheme=bhytstar (exact statistics)")

    def norm_module(self, cfg, position):
        opts = self.options(cfg.norm)
        lam = opts.lambdas[NORM_POSITIONS.index(position)]
        if position == "final":
            if lam == 0:
                return RMSNorm, {}
            return BoundedTanh, {"lam0": lam, "kappa": opts.kappa, "learnable_lambda": True}
        return BoundedTanh, {"lam0": lam, "kappa": opts.kappa, "learnable_lambda": opts.learnable_lambda}

    def configure_layer(self, layer, cfg):
        for sublayer, norm, residual in layer.sublayers():
            pre_norm(layer, sublayer, norm, residual)
        if self.exact:
            return
        first, second = layer.input_layernorm, layer.pre_mlp_layernorm
        first.record_mean_square = True
        second.register_buffer("c_attn", torch.zeros(1, dtype=torch.float32, device=second.weight.device))
        gate = layer.gpas if layer.self_attn_bda.gate_position == "after_add" else None
        lam1, inv_kappa_sq = first.lam, 1.0 / first.kappa ** 2

        def estimate() -> torch.Tensor:
            mean_square, first.last_mean_square = first.last_mean_square, None
            estimate = mean_square + second.c_attn * lam1.detach().float().square() * inv_kappa_sq
            if gate is not None:
                estimate = estimate * gate.scale()[0].float().square()
            return estimate

        second.mean_square_estimate = estimate
        self.refresh(layer, cfg)

    def seq_length(self, cfg) -> int:
        return self.options(cfg.norm).seq_length or cfg.train.seq_length

    def refresh_interval(self, cfg) -> int:
        return self.options(cfg.norm).refresh_interval or max(1, min(1000, cfg.train.steps // 50))

    def refresh(self, layer, cfg) -> None:
        if layer.self_attention.linear_qkv.weight.is_meta:
            return  # a shapes-only build (model/inventory.py: --dry-run, the planner): no values to read
        c_attn = value_output_gain(layer) / (self.seq_length(cfg) * layer.config.hidden_size)
        layer.pre_mlp_layernorm.c_attn.copy_(c_attn)

    def before_step(self, model_chunks, step, cfg):
        if self.exact or step % self.refresh_interval(cfg):
            return
        from megatron.core.utils import unwrap_model

        for chunk in model_chunks:
            for layer in unwrap_model(chunk).decoder.layers:
                self.refresh(layer, cfg)

    def architecture(self, cfg) -> dict:
        arch = super().architecture(cfg)
        for key in ("refresh_interval", "seq_length"):  # how c_attn is kept, not the network
            arch.pop(f"norm.options.{key}")
        return arch

    def te_final_norm(self, cfg) -> bool:
        return self.options(cfg.norm).lambdas[2] == 0

    def export_plan(self, cfg) -> ExportPlan:
        opts = self.options(cfg.norm)
        return ExportPlan(llama_reason="BHyT replaces the norms by γ⊙tanh(λ·x/(κ·rms)), which no stock Llama computes",
                          hf_fields={"norm_type": self.name, "bhyt_kappa": opts.kappa,
                                     "final_norm_type": "rmsnorm" if opts.lambdas[2] == 0 else "bhytstar"})


BHYT_SCHEMES = (BHyT("bhyt", exact=False), BHyT("bhytstar", exact=True))
