"""GPAS: Gradient-Preserving Activation Scaling (methods.md §1).

    y = x − act(α) · stopgrad(x)

Forward value (1 − act(α))·x shrinks the residual stream; the backward Jacobian
w.r.t. x is the identity, so gradients pass unchanged. dL/dα = −act'(α)·Σ g⊙x.
"""

from __future__ import annotations

import functools
import os

import torch
import yaml
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gpas.checkpoint_paths import find_latest
from megatron_gpas.model.norms import mark_sequence_parallel


def _scaled_silu(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    return alpha * torch.sigmoid(beta * alpha)


# Gate activations of the paper's ablation (methods.md §1.2, Table 4). SiLU is the default.
ACTIVATIONS = {
    "silu": lambda beta: F.silu,
    "identity": lambda beta: (lambda a: a),
    "tanh": lambda beta: torch.tanh,
    # ReLU'(0) = 0 in PyTorch: from α = 0 the gate never moves (config validation says so).
    "relu": lambda beta: F.relu,
    "leaky_relu": lambda beta: functools.partial(F.leaky_relu, negative_slope=0.01),
    "scaled_silu": lambda beta: functools.partial(_scaled_silu, beta=beta),  # α·σ(βα)
}

# Megatron-Core optimizer "grad-norm group" for the gates. It is the one parameter
# attribute that survives onto fp32 main params and distributed-optimizer shards,
# which is what lets us clip the gates jointly at their own threshold.
GATE_GRAD_NORM_GROUP = "gpas"


def register_gate_grad_norm_group() -> None:
    import megatron.core.optimizer.optimizer as mcore_optimizer

    if GATE_GRAD_NORM_GROUP not in mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS:
        mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS = (
            *mcore_optimizer.SEPARATE_GRAD_NORM_GROUPS,
            GATE_GRAD_NORM_GROUP,
        )


GATE_CHECKPOINT_KEY = "decoder.layers.gpas.alpha"  # stacked [L, 1 or 2] in a dist-checkpoint


def fixed_gate_values(path: str, num_layers: int) -> torch.Tensor:
    """Predefined gate values α, one row per global layer ([L, 1] or [L, 2]).

    ``path`` is a YAML/JSON file holding a list of L numbers (or L pairs, one per
    sub-layer), or a checkpoint directory of another run (its gates are read offline).
    """
    if os.path.isdir(path):
        source = find_latest(path) or path
    else:
        source = path
    # Every layer asks; read once per (resolved) source and version.
    return _read_gate_values(source, os.path.getmtime(source), num_layers).clone()


@functools.lru_cache(maxsize=4)
def _read_gate_values(path: str, mtime: float, num_layers: int) -> torch.Tensor:
    if os.path.isdir(path):
        # the offline reader: restricted unpickling, the checksums of the files it reads
        from megatron_gpas.hf.dcp_reader import CheckpointReader

        reader = CheckpointReader(path)
        if GATE_CHECKPOINT_KEY not in reader:
            raise ValueError(f"gpas.fixed_values: checkpoint {path} has no GPAS gates ({GATE_CHECKPOINT_KEY})")
        values = reader.read(GATE_CHECKPOINT_KEY).float()
    else:
        with open(path) as f:
            values = torch.tensor(yaml.safe_load(f), dtype=torch.float32)
    values = values.reshape(values.shape[0], -1) if values.dim() > 0 else values.reshape(1, 1)
    if values.shape[0] != num_layers or values.shape[1] not in (1, 2):
        raise ValueError(f"gpas.fixed_values: {path} holds gate values of shape {tuple(values.shape)}; "
                         f"expected {num_layers} layers × 1 (or 2, one per sub-layer)")
    return values


def is_gate(param: torch.Tensor) -> bool:
    return getattr(param, "grad_norm_group", None) == GATE_GRAD_NORM_GROUP


class GPASGate(nn.Module):
    """The learnable scalar gate(s) α of one layer.

    One α (shape [1]) shared by the attention and MLP sub-layers (the paper), or one per
    sub-layer (shape [2]) with ``per_sublayer``. Without ``stop_gradient`` the operator is
    a plain multiplication (1 − act(α))·x (the paper's "w/o sg" ablation). A gate that is
    not ``learnable`` (``gpas.freeze``: fine-tuning, or fixed predefined values) has
    requires_grad=False, so it gets no gradient, no optimizer state and no part in the
    gate clip.
    """

    def __init__(self, config: TransformerConfig, activation: str = "silu", init: float = 0.0, *,
                 per_sublayer: bool = False, stop_gradient: bool = True, learnable: bool = True,
                 silu_beta: float = 8.0):
        super().__init__()
        self.activation = activation
        self.act = ACTIVATIONS[activation](silu_beta)
        self.per_sublayer = per_sublayer
        self.stop_gradient = stop_gradient
        # Created in fp32; in BF16 runs the optimizer keeps an fp32 master copy.
        self.alpha = nn.Parameter(torch.full((2 if per_sublayer else 1,), float(init), dtype=torch.float32),
                                  requires_grad=learnable)
        register_gate_grad_norm_group()
        self.alpha.grad_norm_group = GATE_GRAD_NORM_GROUP
        # The residual is sequence-sharded under SP: dL/dα is a partial sum per TP rank.
        mark_sequence_parallel(self, config)

    def scale(self) -> torch.Tensor:
        """The forward multiplier(s) 1 − act(α) (for logging)."""
        return 1.0 - self.act(self.alpha.detach())

    def multiplier(self, sublayer: int, dtype: torch.dtype) -> torch.Tensor:
        """act(α) of ``sublayer`` (differentiable), in the activations' dtype."""
        return self.act(self.alpha[sublayer if self.per_sublayer else 0]).to(dtype)

    def forward(self, x: torch.Tensor, sublayer: int = 0) -> torch.Tensor:
        a = self.multiplier(sublayer, x.dtype)
        return x - a * (x.detach() if self.stop_gradient else x)
