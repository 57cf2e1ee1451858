"""Megatron dist-checkpoint -> Hugging Face model directory (``tools/convert_to_hf.py``).

    result = export_checkpoint("runs/demo/checkpoints", "exports/demo")

Reads the checkpoint offline (``dcp_reader``: any TP/PP/DP layout, one layer in memory at a
time) and writes config.json, sharded safetensors, generation_config.json, the run's tokenizer
and ``megatron_gpas_export.json`` (what was decided and measured). Everything needed comes from
the checkpoint itself (its ``run_config.yaml`` and ``tokenizer/`` copy).

Formats:
  llama   a stock ``LlamaForCausalLM``: Pre-LN as is; Pre+GPAS and LNS(+GPAS) with the gates
          and LNS factors folded into the weights (``fold.py``), accepted only if the folded
          model's logits match the unfolded ones on a probe batch within ``fold_tolerance``.
  custom  our ``MegatronGPASForCausalLM`` (``modeling_megatron_gpas.py``, shipped in the
          directory; ``trust_remote_code=True``), for every other scheme and as the fallback.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
import yaml

from megatron_gpas.hf import fold as folding
from megatron_gpas.hf.dcp_reader import CheckpointReader
from megatron_gpas.hf.hf_config import AUTO_MAP, attention_shape, custom_config, llama_config
from megatron_gpas.hf.mapping import (
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    MEGATRON_LAYER_PREFIX,
    VOCAB_TENSORS,
    hf_layer_prefix,
    layer_to_hf,
    resize_vocab,
)
from megatron_gpas.hf.safetensors_writer import ShardedSafetensorsWriter
from megatron_gpas.hf.tokenizer_export import export_tokenizer

HF_CODE_DIR = os.path.dirname(os.path.abspath(__file__))
HF_CODE_FILES = ("configuration_megatron_gpas.py", "modeling_megatron_gpas.py")
REPORT_NAME = "megatron_gpas_export.json"
GATES_KEY = "decoder.layers.gpas.alpha"
# Default accepted logit error of a fold, relative to the largest |logit|: fp32 folds are exact up
# to RMSNorm's ε and rounding (~1e-6); a 16-bit export adds one rounding of the folded weights.
FOLD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_SHAPE = (2, 64)  # probe batch of the fold check


class ExportError(ValueError):
    pass


@dataclass
class ExportResult:
    out_dir: str
    format: str  # llama | custom
    reason: str
    checkpoint: str
    dtype: str
    fold_error: float | None = None
    fold_tolerance: float | None = None
    cumulative_scales: list[float] | None = None
    weight_files: list[str] = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)


def _layer_tensors(reader: CheckpointReader, layer: int) -> dict[str, torch.Tensor]:
    out = {}
    for key in reader.metadata:
        if not key.startswith(MEGATRON_LAYER_PREFIX):
            continue
        suffix = key[len(MEGATRON_LAYER_PREFIX):]
        if suffix not in LAYER_TENSORS:  # never drop weights silently
            raise ExportError(f"checkpoint tensor {key!r} has no Hugging Face mapping (megatron_gpas/hf/mapping.py)")
        out[suffix] = reader.read_layer(key, layer)
    return out


def _hf_layer(reader, layer: int, config, dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in layer_to_hf(_layer_tensors(reader, layer), attention_shape(config)).items()}


def _global_tensor(reader, key: str, config, dtype) -> torch.Tensor:
    tensor = reader.read(key).to(dtype)
    return resize_vocab(tensor, config.vocab_size) if key in VOCAB_TENSORS else tensor


def _module(cls, config, layer: int, tensors: dict[str, torch.Tensor]):
    """A decoder layer holding ``tensors`` (fp32), built without allocating random weights."""
    with torch.device("meta"):
        module = cls(config, layer)
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return module.eval()


@torch.no_grad()
def fold_logit_error(reader, config, plan: folding.FoldPlan, dtype) -> float:
    """max |logits(folded Llama) − logits(our class)| / max |logits(our class)| on a seeded probe
    batch, both computed in fp32 from the weights as they would be written (``dtype``), streaming
    the layers (one layer of each model in memory)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from megatron_gpas.hf.modeling_megatron_gpas import MegatronGPASDecoderLayer

    custom, llama = custom_config_copy(config), llama_config(config)
    for c in (custom, llama):
        c._attn_implementation = "sdpa"  # causal when no mask is given
    batch, seq = PROBE_SHAPE[0], min(PROBE_SHAPE[1], config.max_position_embeddings)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    hidden = _global_tensor(reader, "embedding.word_embeddings.weight", config, dtype).float()[tokens]
    rope = LlamaRotaryEmbedding(config=llama)(hidden, positions)
    h_custom, h_llama = hidden, hidden.clone()
    for layer in range(config.num_hidden_layers):
        tensors = _hf_layer(reader, layer, config, dtype)
        h_custom = _module(MegatronGPASDecoderLayer, custom, layer, tensors)(
            h_custom, position_embeddings=rope, position_ids=positions)
        h_llama = _module(LlamaDecoderLayer, llama, layer, folding.fold_layer(tensors, plan, layer))(
            h_llama, position_embeddings=rope, position_ids=positions)
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.copy_(_global_tensor(reader, "decoder.final_layernorm.weight", config, dtype).float())
    head = _global_tensor(reader, "output_layer.weight", config, dtype).float()
    logits_custom, logits_llama = norm(h_custom) @ head.T, norm(h_llama) @ head.T
    return float((logits_llama - logits_custom).abs().max() / logits_custom.abs().max())


def custom_config_copy(config):
    return type(config).from_dict(config.to_dict())


def _decide(reader, config, target: str, dtype, tolerance: float | None):
    """(format, reason, fold plan or None, measured fold error or None, tolerance)."""
    scheme, gpas = config.norm_scheme, config.gpas
    fixed_lns = scheme == "lns" and config.lns_mode == "fixed"
    if target == "custom":
        return "custom", "requested (--format custom)", None, None, None
    if scheme not in ("pre", "lns"):
        why = {"post": "Post-LN normalizes after the residual add",
               "deepnorm": "DeepNorm normalizes after a scaled residual add",
               "sandwich": "Sandwich-LN normalizes each sub-layer's output",
               "mixln": "Mix-LN has Post-LN layers"}.get(scheme, f"scheme {scheme!r}")
        reason = f"{why}: no stock Llama computes it"
        if target == "llama":
            raise ExportError(f"cannot export as a stock Llama: {reason}")
        return "custom", reason, None, None, None
    if not gpas and not fixed_lns:
        return "llama", f"norm.scheme={scheme} is a stock Llama", None, None, None
    gates = reader.read(GATES_KEY) if gpas else None
    try:
        plan = folding.plan_fold(config, gates)
    except folding.FoldError as e:
        if target == "llama":
            raise ExportError(f"cannot export as a stock Llama: {e}") from e
        return "custom", f"fold impossible: {e}", None, None, None
    tolerance = FOLD_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    error = fold_logit_error(reader, config, plan, dtype)
    if error > tolerance:
        reason = (f"the folded Llama's logits differ by {error:.2e} (relative) > tolerance {tolerance:.0e}; "
                  f"smallest cumulative scale {plan.min_scale:.3g} (RMSNorm's ε grows as ε/P²)")
        if target == "llama":
            raise ExportError(f"cannot export as a stock Llama: {reason}")
        return "custom", reason, plan, error, tolerance
    what = " and ".join(x for x in ("GPAS gates" if gpas else "", "LNS 1/√l factors" if fixed_lns else "") if x)
    return "llama", f"{what} folded into the weights (logit error {error:.2e})", plan, error, tolerance


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="layer")


def export_checkpoint(checkpoint_path: str, out_dir: str, *, target: str = "auto", dtype: str = "auto",
                      fold_tolerance: float | None = None, max_shard_bytes: int = 5 * 1024**3,
                      tokenizer_path: str | None = None, progress: bool = True, overwrite: bool = False) -> ExportResult:
    from megatron_gpas.checkpoint import find_latest

    if target not in ("auto", "llama", "custom"):
        raise ExportError(f"unknown target format {target!r} (auto | llama | custom)")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r} (auto | {' | '.join(DTYPES)})")
    path = find_latest(checkpoint_path) if os.path.isdir(checkpoint_path) else None
    if path is None:
        raise ExportError(f"no complete checkpoint at {checkpoint_path}")
    reader = CheckpointReader(path)
    if reader.run_config is None:
        raise ExportError(f"{path} has no run_config.yaml (written by megatron_gpas since its first release); "
                          "cannot tell the architecture")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"output directory {out_dir} exists and is not empty (use --overwrite)")
    torch_dtype = reader.dtype("embedding.word_embeddings.weight") if dtype == "auto" else DTYPES[dtype]

    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        result = _export(reader, path, partial, out_dir, target, torch_dtype, fold_tolerance, max_shard_bytes,
                         tokenizer_path, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)  # a crashed export never leaves a complete-looking directory
    return result


def _export(reader, path, partial, out_dir, target, torch_dtype, fold_tolerance, max_shard_bytes, tokenizer_path,
            progress) -> ExportResult:
    tokenizer_report, (bos, eos) = export_tokenizer(path, reader.run_config, partial, override=tokenizer_path)
    config = custom_config(reader.run_config, bos_token_id=bos, eos_token_id=eos, dtype=torch_dtype)
    fmt, reason, plan, error, tolerance = _decide(reader, config, target, torch_dtype, fold_tolerance)

    # HF order: embedding, layers, final norm, head (one tensor of each read at a time)
    embedding, *after_layers = GLOBAL_TENSORS.items()
    writer = ShardedSafetensorsWriter(partial, max_shard_bytes)
    writer.add(embedding[1], _global_tensor(reader, embedding[0], config, torch_dtype))
    for layer in _progress(range(config.num_hidden_layers), config.num_hidden_layers, "export", progress):
        tensors = _hf_layer(reader, layer, config, torch_dtype)
        if fmt == "llama":
            tensors = folding.fold_layer(tensors, plan, layer) if plan is not None else tensors
        for name, tensor in tensors.items():
            writer.add(hf_layer_prefix(layer) + name, tensor)
    for key, hf_key in after_layers:
        writer.add(hf_key, _global_tensor(reader, key, config, torch_dtype))
    weight_files = writer.close()

    if fmt == "llama":
        hf_config = llama_config(config)
        hf_config.architectures = ["LlamaForCausalLM"]
    else:
        hf_config = config
        hf_config.architectures = ["MegatronGPASForCausalLM"]
        hf_config.auto_map = dict(AUTO_MAP)
        for name in HF_CODE_FILES:
            shutil.copy(os.path.join(HF_CODE_DIR, name), os.path.join(partial, name))
    hf_config.save_pretrained(partial)
    _write_generation_config(partial, bos, eos)
    with open(os.path.join(partial, "megatron_run_config.yaml"), "w") as f:
        yaml.safe_dump(reader.run_config, f, sort_keys=False)

    result = ExportResult(out_dir=os.path.abspath(out_dir), format=fmt, reason=reason, checkpoint=os.path.abspath(path),
                          dtype=str(torch_dtype).removeprefix("torch."), fold_error=error, fold_tolerance=tolerance,
                          cumulative_scales=plan.cumulative_scales if plan else None, weight_files=weight_files,
                          tokenizer=tokenizer_report)
    with open(os.path.join(partial, REPORT_NAME), "w") as f:
        json.dump(asdict(result), f, indent=2)
    return result


def _write_generation_config(out_dir: str, bos, eos) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out_dir)
