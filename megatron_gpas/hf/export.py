"""Megatron dist-checkpoint -> Hugging Face model directory (``tools/convert_to_hf.py``).

    result = export_checkpoint("runs/demo/checkpoints", "exports/demo")

Reads the checkpoint offline (``dcp_reader``: any TP/PP/DP layout, one layer in memory at a
time) and writes config.json, sharded safetensors, generation_config.json, the run's tokenizer
and ``megatron_gpas_export.json`` (what was decided and measured). Everything needed comes from
the checkpoint itself (its ``run_config.yaml`` and ``tokenizer/`` copy).

Formats (the scheme's ``export_plan`` says whether it has a stock-Llama form):
  llama   a stock ``LlamaForCausalLM``: Pre-LN as is; GPAS gates and LNS factors folded into
          the weights (``fold.py``), norm biases into linear biases, OSP's SSNorm scalars into
          per-channel weights, embedding/head transforms merged, a zero-mean residual stream
          written centred (LayerNorm = RMSNorm); accepted only if the folded model's logits
          match the unfolded ones on a probe batch within ``fold_tolerance``.
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
from megatron_gpas.config import config_from_tree
from megatron_gpas.hf.mapping import (
    GLOBAL_TENSORS,
    HEAD_TENSORS,
    LAYER_TENSORS,
    MEGATRON_LAYER_PREFIX,
    TRANSFORM_TENSORS,
    VOCAB_TENSORS,
    fold_transforms,
    hf_layer_prefix,
    layer_to_hf,
    resize_vocab,
)
from megatron_gpas.model.schemes import SCHEMES
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


class ExportSource:
    """A checkpoint's tensors as our HF class reads them: layers renamed and split (``mapping``),
    single-scale norm weights broadcast to every channel, the scheme's embedding/head transforms
    merged into the embedding and head tables, and — where the scheme's export plan says so — the
    writes to the residual stream centred. Everything is read lazily (one layer at a time) and
    returned in ``dtype``; the merges are computed in float64."""

    def __init__(self, reader: CheckpointReader, config, plan, dtype):
        self.reader, self.config, self.plan, self.dtype = reader, config, plan, dtype
        known = set(GLOBAL_TENSORS) | set(TRANSFORM_TENSORS)
        for key in reader.metadata:  # never drop weights silently
            if key.startswith(MEGATRON_LAYER_PREFIX):
                if key[len(MEGATRON_LAYER_PREFIX):] not in LAYER_TENSORS:
                    raise ExportError(f"checkpoint tensor {key!r} has no Hugging Face mapping (megatron_gpas/hf/mapping.py)")
            elif key not in known and not key.startswith("optimizer."):
                raise ExportError(f"checkpoint tensor {key!r} has no Hugging Face mapping (megatron_gpas/hf/mapping.py)")
        self._tables = None

    def read(self, key: str) -> torch.Tensor:
        """A non-layer tensor in the export dtype, the vocabulary ones cut to the model's vocab_size."""
        return self._read(key).to(self.dtype).contiguous()

    def _read(self, key: str) -> torch.Tensor:
        tensor = self.reader.read(key)
        return resize_vocab(tensor, self.config.vocab_size) if key in VOCAB_TENSORS else tensor

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, LM head) with the transforms merged and the embedding centred if asked."""
        if self._tables is None:
            transforms = {key: self.reader.read(key).double() for key in TRANSFORM_TENSORS if key in self.reader}
            embedding, head = fold_transforms(self._read("embedding.word_embeddings.weight").double(),
                                              self._read("output_layer.weight").double(), transforms)
            if self.plan.centre_residual_writes:
                embedding = embedding - embedding.mean(-1, keepdim=True)
            self._tables = (embedding.to(self.dtype), head.to(self.dtype))
        return self._tables

    def final_norm(self) -> dict[str, torch.Tensor]:
        """HF name (model.norm.*) -> tensor, the weight broadcast when it is a single scale."""
        out = {}
        for key, hf_key in GLOBAL_TENSORS.items():
            if key.startswith("decoder.final_layernorm.") and key in self.reader:
                out[hf_key] = self._read(key).to(self.dtype)
        weight = out.get("model.norm.weight")  # none without a final norm (nGPT)
        if weight is not None and weight.numel() == 1:
            out["model.norm.weight"] = weight.expand(self.config.hidden_size).contiguous()
        return out

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        megatron = {key[len(MEGATRON_LAYER_PREFIX):]: self.reader.read_layer(key, layer)
                    for key in self.reader.metadata if key.startswith(MEGATRON_LAYER_PREFIX)}
        tensors = layer_to_hf(megatron, attention_shape(self.config))
        for key, factor in self.plan.tensor_factors.items():  # the scheme's constants, into the weights
            tensors[key] = tensors[key].double() * factor
        if self.plan.centre_residual_writes:  # what f writes: W − mean over the output (hidden) axis
            for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                tensors[key] = tensors[key].double() - tensors[key].double().mean(0, keepdim=True)
        return {k: v.to(self.dtype).contiguous() for k, v in tensors.items()}


def _module(cls, config, layer: int, tensors: dict[str, torch.Tensor]):
    """A decoder layer holding ``tensors`` (fp32), built without allocating random weights."""
    with torch.device("meta"):
        module = cls(config, layer)
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return module.eval()


@torch.no_grad()
def fold_logit_error(source: ExportSource, plan: folding.FoldPlan) -> float:
    """max |logits(folded Llama) − logits(our class)| / max |logits(our class)| on a seeded probe
    batch, both computed in fp32 from the weights as they would be written, streaming the layers
    (one layer of each model in memory)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from megatron_gpas.hf.modeling_megatron_gpas import MegatronGPASDecoderLayer, make_norm

    config = source.config
    custom, llama = custom_config_copy(config), llama_config(config, biases=plan.has_biases)
    for c in (custom, llama):
        c._attn_implementation = "sdpa"  # causal when no mask is given
    batch, seq = PROBE_SHAPE[0], min(PROBE_SHAPE[1], config.max_position_embeddings)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    embedding, head = (t.float() for t in source.tables())
    hidden = embedding[tokens]
    rope = LlamaRotaryEmbedding(config=llama)(hidden, positions)
    h_custom, h_llama = hidden, hidden.clone()
    for layer in range(config.num_hidden_layers):
        tensors = source.layer(layer)
        h_custom = _module(MegatronGPASDecoderLayer, custom, layer, tensors)(
            h_custom, position_embeddings=rope, position_ids=positions)
        h_llama = _module(LlamaDecoderLayer, llama, layer, folding.fold_layer(tensors, plan, layer))(
            h_llama, position_embeddings=rope, position_ids=positions)
    final = {k.removeprefix("model.norm."): v.float() for k, v in source.final_norm().items()}
    custom_norm = make_norm(custom, "final")
    custom_norm.load_state_dict(final, strict=True)
    llama_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    llama_norm.weight.copy_(final["weight"])
    logits_custom, logits_llama = custom_norm(h_custom) @ head.T, llama_norm(h_llama) @ head.T
    return float((logits_llama - logits_custom).abs().max() / logits_custom.abs().max())


def custom_config_copy(config):
    return type(config).from_dict(config.to_dict())


def _decide(source: ExportSource, run_cfg, target: str, tolerance: float | None):
    """(format, reason, fold plan or None, measured fold error or None, tolerance)."""
    config, reader, dtype = source.config, source.reader, source.dtype
    if target == "custom":
        return "custom", "requested (--format custom)", None, None, None

    def no_llama(reason: str):
        if target == "llama":
            raise ExportError(f"cannot export as a stock Llama: {reason}")
        return "custom", reason, None, None, None

    if source.plan.llama_reason is not None:
        return no_llama(f"{source.plan.llama_reason}: no stock Llama computes it")
    final_bias = source.final_norm().get("model.norm.bias")
    if final_bias is not None and final_bias.abs().max() > 0:
        return no_llama("the final norm's bias β adds W_out·β to the logits, and LlamaForCausalLM's head has no bias "
                        "(norm.bias=false trains without it)")
    gates = reader.read(GATES_KEY) if config.gpas else None
    try:
        plan = folding.plan_fold(config, gates, source.plan.norm_scales)
    except folding.FoldError as e:
        return no_llama(f"fold impossible: {e}")
    folds = [what for what, present in (
        ("GPAS gates", config.gpas), ("the norms' fixed 1/√l factors", source.plan.norm_scales is not None),
        ("norm biases into linear biases", plan.has_biases),
        ("the embedding/head transforms", any(key in reader for key in TRANSFORM_TENSORS)),
        ("centred residual writes", source.plan.centre_residual_writes)) if present]
    if not folds:
        return "llama", f"norm.scheme={run_cfg.norm.scheme} is a stock Llama", plan, None, None
    tolerance = FOLD_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    error = fold_logit_error(source, plan)
    if error > tolerance:
        return no_llama(f"the folded Llama's logits differ by {error:.2e} (relative) > tolerance {tolerance:.0e}; "
                        f"smallest cumulative scale {plan.min_scale:.3g} (RMSNorm's ε grows as ε/P²)")
    return "llama", f"{' and '.join(folds)} folded into the weights (logit error {error:.2e})", plan, error, tolerance


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
    run_cfg = config_from_tree({k: reader.run_config.get(k) or {} for k in ("model", "norm", "gpas", "train")})
    scheme_plan = SCHEMES[run_cfg.norm.scheme].export_plan(run_cfg)
    config = custom_config(reader.run_config, scheme_plan.hf_fields, bos_token_id=bos, eos_token_id=eos,
                           dtype=torch_dtype)
    source = ExportSource(reader, config, scheme_plan, torch_dtype)
    fmt, reason, plan, error, tolerance = _decide(source, run_cfg, target, fold_tolerance)

    # HF order: embedding, layers, final norm, head (one layer read at a time)
    embedding, head = source.tables()
    writer = ShardedSafetensorsWriter(partial, max_shard_bytes)
    writer.add("model.embed_tokens.weight", embedding)
    for layer in _progress(range(config.num_hidden_layers), config.num_hidden_layers, "export", progress):
        tensors = source.layer(layer)
        if fmt == "llama":
            tensors = folding.fold_layer(tensors, plan, layer)
        for name, tensor in tensors.items():
            writer.add(hf_layer_prefix(layer) + name, tensor)
    final = source.final_norm()
    if fmt == "llama":
        final = {"model.norm.weight": final["model.norm.weight"]}  # a zero bias (checked) has no place there
    for name, tensor in final.items():
        writer.add(name, tensor)
    writer.add("lm_head.weight", head)
    for key in HEAD_TENSORS:
        if key in reader:
            writer.add(GLOBAL_TENSORS[key], source.read(key))
    weight_files = writer.close()

    if fmt == "llama":
        hf_config = llama_config(config, biases=plan.has_biases)
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
                          cumulative_scales=plan.cumulative_scales if error is not None else None,
                          weight_files=weight_files,
                          tokenizer=tokenizer_report)
    with open(os.path.join(partial, REPORT_NAME), "w") as f:
        json.dump(asdict(result), f, indent=2)
    return result


def _write_generation_config(out_dir: str, bos, eos) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out_dir)
