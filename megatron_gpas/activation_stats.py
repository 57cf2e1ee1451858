"""Per-layer variance of each layer's input hidden state x_l (the GPAS paper's Fig. 4b).

Recorded only on the steps that are logged (a forward pre-hook per layer that is a no-op
otherwise), accumulated over micro-batches as (count, sum, sum of squares) in float64
and reduced over the whole job, so the value is the same whatever the TP/PP/DP layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.utils import unwrap_model


class LayerInputVariance:
    def __init__(self, model_chunks, num_layers: int, sequence_parallel: bool, device):
        self.sequence_parallel = sequence_parallel
        self.moments = torch.zeros(3, num_layers, dtype=torch.float64, device=device)
        self.active = False
        for chunk in model_chunks:
            for layer in unwrap_model(chunk).decoder.layers:
                layer.register_forward_pre_hook(self._hook(layer.layer_number - 1), with_kwargs=True)

    def _hook(self, index: int):
        def record(module, args, kwargs):
            # full recompute (train.recompute=full) runs a layer twice: in the forward under no_grad
            # and again in the backward with grad enabled, both inside Megatron's checkpoint; the
            # second run sees the same input and is not counted again
            if not self.active or (is_checkpointing() and torch.is_grad_enabled()):
                return
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x = x.detach().double()
            self.moments[0, index] += x.numel()
            self.moments[1, index] += x.sum()
            self.moments[2, index] += x.square().sum()

        return record

    def collect(self) -> torch.Tensor:
        """Variance per global layer over everything seen since the last collect; resets."""
        moments = self.moments.clone()
        self.moments.zero_()
        if self.sequence_parallel:  # each TP rank saw its slice of the tokens
            dist.all_reduce(moments, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(moments, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(moments, group=parallel_state.get_pipeline_model_parallel_group())
        count = moments[0].clamp(min=1)
        mean = moments[1] / count
        return (moments[2] / count - mean.square()).cpu()
