"""Per-layer telemetry: how each layer's gradients, weights, updates, residual branches and learned
scales evolve (the GPAS paper's analysis, its Figs. 3-6, for every scheme).

Measured only on logged steps (every hook is a no-op otherwise) and reduced over the whole job,
so a tag has the same value in every TP/PP/DP layout. l is the global 1-based layer number;
``_attn`` / ``_mlp`` restrict a layer's value to the parameters of one sub-layer (its norm slot,
the sub-layer and its residual slot); the bare tag covers the whole layer (the GPAS gate too).

    layers/grad_norm/layer_{l}[_attn|_mlp]     L2 norm of the gradient (before clipping)
    layers/grad_norm/outside_layers            the rest (embedding, final norm, head): with the
                                               layers it makes up train/grad_norm
    layers/weight_norm/layer_{l}[_attn|_mlp]   L2 norm of the weights after the step
    layers/update_ratio/layer_{l}[_attn|_mlp]  ‖W_after − W_before‖ / ‖W_before‖ of the step
    layers/branch_rms/layer_{l}_{attn|mlp}     RMS of the sub-layer's output f(·) entering the residual slot
    layers/branch_to_shortcut/layer_{l}_{attn|mlp}  RMS(f(·)) / RMS(shortcut): below 1 the shortcut dominates
    scales/{name}/layer_{l}                    the scheme's learned scales (Scheme.layer_scales: DyT α,
                                               BHyT λ, SSNorm g, nGPT/anGPT mean |α|)

Gradients are read after the backward, before the clip, from the buffers Megatron's DDP reduced
(with the distributed optimizer only this rank's shard of each buffer is reduced: the owned ranges
are summed and all-reduced over its data-parallel group). Tensor-parallel shards are summed over
TP, duplicates counted once. The update ratio keeps a host copy of this rank's layer weights from
before the step (logged steps only).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.utils import unwrap_model

from megatron_gpas.model.unit_norm import shard_ranges

SUBLAYERS = ("attn", "mlp")
SUBLAYER_MODULES = {"input_layernorm": 0, "self_attention": 0, "self_attn_bda": 0,
                    "pre_mlp_layernorm": 1, "mlp": 1, "mlp_bda": 1}


def _sublayer_of(name: str) -> int | None:
    """0 (attention), 1 (MLP) or None (the layer's own, e.g. the GPAS gate) for a parameter name."""
    return SUBLAYER_MODULES.get(name.split(".", 1)[0])


def _reduce_over_model_parallel(values: torch.Tensor) -> torch.Tensor:
    """Sum over TP and PP: each rank holds its shards' and its stages' parts."""
    dist.all_reduce(values, group=parallel_state.get_tensor_model_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    return values


class LayerTelemetry:
    def __init__(self, model_chunks, optimizer, scheme, num_layers: int, sequence_parallel: bool, device):
        self.model, self.optimizer, self.scheme = model_chunks, optimizer, scheme
        self.num_layers, self.sequence_parallel, self.device = num_layers, sequence_parallel, device
        self.active = False
        # (global layer index, sub-layer or None, parameter) of every layer parameter on this rank
        self.layer_params: list[tuple[int, int | None, torch.nn.Parameter]] = []
        self.layers = []
        for chunk in model_chunks:
            for layer in unwrap_model(chunk).decoder.layers:
                index = layer.layer_number - 1
                self.layers.append(layer)
                for name, param in layer.named_parameters():
                    self.layer_params.append((index, _sublayer_of(name), param))
                for sublayer, slot in ((0, layer.self_attn_bda), (1, layer.mlp_bda)):
                    slot.register_forward_hook(self._branch_hook(index, sublayer))
        in_layers = {id(p) for _, _, p in self.layer_params}
        self.outside = [p for chunk in model_chunks for p in chunk.parameters() if id(p) not in in_layers]
        names = sorted(scheme.layer_scales(self.layers[0])) if self.layers else []
        self.scale_names = names
        self._reset()

    def _reset(self):
        # [3, L, 3]: branch and shortcut sums of squares and element counts, per layer × (attn, mlp, -)
        self.branch_moments = torch.zeros(3, self.num_layers, 2, dtype=torch.float64, device=self.device)
        self.grad_squares: torch.Tensor | None = None
        self.before: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ hooks

    def _branch_hook(self, index: int, sublayer: int):
        """Wraps the residual slot's function (Megatron calls ``slot(training, fused)(branch, shortcut, p)``)."""

        def hook(module, args, residual_fn):
            if not self.active or (is_checkpointing() and torch.is_grad_enabled()):  # a full-recompute rerun
                return None

            def observed(branch_with_bias, shortcut, dropout_prob):
                branch, bias = branch_with_bias
                branch = (branch if bias is None else branch + bias).detach()
                moments = self.branch_moments[:, index, sublayer]
                moments[0] += branch.double().square().sum()
                moments[1] += shortcut.detach().double().square().sum()
                moments[2] += branch.numel()
                return residual_fn(branch_with_bias, shortcut, dropout_prob)

            return observed

        return hook

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep a host copy of this rank's layer weights (for the update ratio)."""
        if self.active:
            self.before = [p.detach().to("cpu", torch.float32, copy=True) for _, _, p in self.layer_params]

    @torch.no_grad()
    def after_backward(self) -> None:
        """Per-layer sums of squares of the reduced gradients (before the clip): [L + 1, 3] (whole
        layer, attn, mlp; the last row: outside the layers)."""
        if not self.active:
            return
        squares = torch.zeros(self.num_layers + 1, 3, dtype=torch.float64, device=self.device)
        owned, dp_group = self._owned_gradient_ranges()
        for index, sublayer, param in self.layer_params:
            value = self._grad_squares(param, owned)
            squares[index, 0] += value
            if sublayer is not None:
                squares[index, 1 + sublayer] += value
        for param in self.outside:
            squares[self.num_layers, 0] += self._grad_squares(param, owned)
        if dp_group is not None:
            dist.all_reduce(squares, group=dp_group)
        self.grad_squares = _reduce_over_model_parallel(squares)

    def _owned_gradient_ranges(self):
        """With the distributed optimizer: {param: (start, end)} of the reduced part of its gradient
        buffer on this rank, and the optimizer's data-parallel group; else (None, None)."""
        inner = getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer]
        owned, group = {}, None
        for opt in inner:
            if hasattr(opt, "model_param_gbuf_map"):
                group = opt.data_parallel_group
                owned.update({param: (start, end) for param, (_, start, end) in shard_ranges(opt).items()})
        return (owned, group) if group is not None else (None, None)

    @staticmethod
    def _grad_squares(param, owned) -> torch.Tensor:
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is None or not param_is_not_tensor_parallel_duplicate(param):
            return torch.zeros((), dtype=torch.float64, device=param.device)
        if owned is not None:  # the distributed optimizer reduced only this rank's range of the buffer
            if param not in owned:
                return torch.zeros((), dtype=torch.float64, device=param.device)
            start, end = owned[param]
            grad = grad.view(-1)[start:end]
        return grad.double().square().sum()

    # ------------------------------------------------------------------ collect

    @torch.no_grad()
    def collect(self) -> dict[str, float]:
        """Every tag of this logged step (a collective: every rank calls it); resets."""
        values: dict[str, float] = {}
        suffixes = ("", "_attn", "_mlp")
        if self.grad_squares is not None:
            for index in range(self.num_layers):
                for column, suffix in enumerate(suffixes):
                    values[f"layers/grad_norm/layer_{index + 1}{suffix}"] = math.sqrt(self.grad_squares[index, column])
            values["layers/grad_norm/outside_layers"] = math.sqrt(self.grad_squares[self.num_layers, 0])
        weights = torch.zeros(self.num_layers, 3, dtype=torch.float64, device=self.device)
        updates = torch.zeros_like(weights)
        before_weights = torch.zeros_like(weights)
        for i, (index, sublayer, param) in enumerate(self.layer_params):
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            w = param.detach().double()
            columns = [0] if sublayer is None else [0, 1 + sublayer]
            weights[index, columns] += w.square().sum()
            if self.before is not None:
                old = self.before[i].to(w.device, torch.float64)
                updates[index, columns] += (w - old).square().sum()
                before_weights[index, columns] += old.square().sum()
        reduced = _reduce_over_model_parallel(torch.stack([weights, updates, before_weights]))
        for index in range(self.num_layers):
            for column, suffix in enumerate(suffixes):
                tag = f"layer_{index + 1}{suffix}"
                values[f"layers/weight_norm/{tag}"] = math.sqrt(reduced[0, index, column])
                if self.before is not None:
                    values[f"layers/update_ratio/{tag}"] = math.sqrt(reduced[1, index, column] / max(
                        float(reduced[2, index, column]), 1e-30))
        self._collect_branches(values)
        self._collect_scales(values)
        self._reset()
        return values

    def _collect_branches(self, values: dict[str, float]) -> None:
        moments = self.branch_moments.clone()
        if self.sequence_parallel:  # each TP rank saw its slice of the tokens
            dist.all_reduce(moments, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(moments, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(moments, group=parallel_state.get_pipeline_model_parallel_group())
        if not bool((moments[2] > 0).all()):
            return  # no forward was observed (not a logged step)
        branch_rms, shortcut_rms = (moments[0] / moments[2]).sqrt(), (moments[1] / moments[2]).sqrt()
        for index in range(self.num_layers):
            for sublayer, name in enumerate(SUBLAYERS):
                tag = f"layer_{index + 1}_{name}"
                values[f"layers/branch_rms/{tag}"] = float(branch_rms[index, sublayer])
                values[f"layers/branch_to_shortcut/{tag}"] = float(branch_rms[index, sublayer] /
                                                                   shortcut_rms[index, sublayer].clamp(min=1e-30))

    def _collect_scales(self, values: dict[str, float]) -> None:
        if not self.scale_names:
            return
        scales = torch.zeros(self.num_layers, len(self.scale_names), dtype=torch.float64, device=self.device)
        for layer in self.layers:
            found = self.scheme.layer_scales(layer)
            for column, name in enumerate(self.scale_names):
                scales[layer.layer_number - 1, column] = float(found[name])
        # replicated over TP: only the pipeline stages hold different layers
        dist.all_reduce(scales, group=parallel_state.get_pipeline_model_parallel_group())
        for index in range(self.num_layers):
            for column, name in enumerate(self.scale_names):
                values[f"scales/{name}/layer_{index + 1}"] = float(scales[index, column])
