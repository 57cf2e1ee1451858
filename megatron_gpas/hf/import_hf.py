"""Hugging Face model directory -> megatron_gpas checkpoint (``tools/convert_from_hf.py``).

Imports a stock Llama (``model_type: llama``; Pre-LN) or one of our own exports
(``model_type: megatron_gpas``, any scheme, or a folded native export). The Megatron model is
built under the current parallel layout (one process, or torchrun with ``parallel.tensor`` /
``parallel.pipeline`` to spread memory); each rank copies its shard of every tensor from the
safetensors files (read lazily, one tensor at a time) and the result is saved with
dist-checkpointing, so it loads under any layout: resume with
``checkpoint.load_optimizer=false`` or fine-tune with ``checkpoint.pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from megatron_gpas.hf.hf_config import SCHEME_FIELDS, attention_shape
from megatron_gpas.model.schemes import LLAMA_SCHEME, SCHEMES
from megatron_gpas.hf.mapping import (
    FC1,
    GLOBAL_TENSORS,
    TRANSFORM_TENSORS,
    VOCAB_TENSORS,
    hf_layer_prefix,
    layer_from_hf,
    resize_vocab,
)


class HFImportError(ValueError):
    pass


class SafetensorsDirectory:
    """Lazy tensor access to the weights of an HF model directory."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise HFImportError(f"{hf_dir} has no model.safetensors(.index.json); only safetensors weights are read")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {name: safe_open(os.path.join(hf_dir, name), framework="pt") for name in files}
        self._where = weight_map or {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self):
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise HFImportError(f"the Hugging Face weights have no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)


def run_tree_from_hf(hf_dir: str) -> dict:
    """The architecture part of a run config (model, norm, gpas) for an HF directory; the full
    saved config of the original run is the base when the directory is one of our exports."""
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_file):
        raise HFImportError(f"{hf_dir} has no config.json")
    with open(config_file) as f:
        c = json.load(f)
    model_type = c.get("model_type")
    if model_type not in ("llama", "megatron_gpas"):
        raise HFImportError(f"only Llama-architecture models (model_type 'llama') and megatron_gpas exports can be "
                           f"imported; {hf_dir} has model_type {model_type!r}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling ({rope.get('rope_type')}) is not implemented by megatron_gpas' model")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("attention/MLP biases are not part of megatron_gpas' model")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {c.get('hidden_act')!r} (only SwiGLU with SiLU)")
    if problems:
        raise HFImportError(f"cannot import {hf_dir}: " + "; ".join(problems))

    tree: dict = {}
    saved = os.path.join(hf_dir, "megatron_run_config.yaml")
    if os.path.isfile(saved):  # our export: keep the network options config.json does not carry
        with open(saved) as f:
            saved_tree = yaml.safe_load(f) or {}
        tree = {section: saved_tree.get(section) or {} for section in ("model", "norm", "gpas")}
    heads = c["num_attention_heads"]
    tree["model"] = {**tree.get("model", {}), "preset": None,
                     "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
                     "num_attention_heads": heads, "num_query_groups": c.get("num_key_value_heads") or heads,
                     "kv_channels": c.get("head_dim") or c["hidden_size"] // heads,
                     "ffn_hidden_size": c["intermediate_size"], "vocab_size": c["vocab_size"],
                     "max_seq_length": c.get("max_position_embeddings", 2048), "rope_base": float(rope_theta)}
    ours = model_type == "megatron_gpas"
    tree["norm"] = {**tree.get("norm", {}), "eps": c.get("rms_norm_eps", 1e-6),
                    "scheme": c.get("norm_scheme", LLAMA_SCHEME) if ours else tree.get("norm", {}).get("scheme",
                                                                                                LLAMA_SCHEME)}
    if ours:
        tree["norm"].update(mixln_post_layers=c.get("mixln_post_layers"), lns_mode=c.get("lns_mode", "init"))
        tree["gpas"] = {**tree.get("gpas", {}), "enabled": c.get("gpas", False),
                        **{k.removeprefix("gpas_"): c[k] for k in SCHEME_FIELDS if k.startswith("gpas_") and k in c}}
    else:  # a stock Llama (native exports have gates, transforms and norm scalars folded in)
        tree["gpas"] = {**tree.get("gpas", {}), "enabled": False}
        exported_as = SCHEMES.get(tree["norm"]["scheme"], SCHEMES[LLAMA_SCHEME])
        tree["norm"] = exported_as.llama_import_norm(tree["norm"])
    tree["_tie_word_embeddings"] = bool(c.get("tie_word_embeddings", False))
    tree["_model_type"] = model_type
    return tree


def tokenizer_files(hf_dir: str) -> tuple[str, str] | None:
    """(kind, file) of the tokenizer an HF directory carries (None if none)."""
    for name, kind in (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "huggingface")):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return kind, os.path.join(hf_dir, name)
    return None


def _tensor_parallel_shard(full: torch.Tensor, param: torch.Tensor, key: str) -> torch.Tensor:
    """This TP rank's part of a global (Megatron-layout) tensor."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if key == FC1:  # each rank holds [its gate rows; its up rows]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    return full.chunk(tp, dim=param.partition_dim)[rank]


def _copy(param: torch.Tensor, full: torch.Tensor, key: str, where: str) -> None:
    if param.numel() == 1 and full.numel() > 1:  # a single-scale norm exported as one weight per channel
        if not torch.all(full == full.reshape(-1)[0]):
            raise HFImportError(f"{where}: the model has one scale here, the Hugging Face tensor varies per channel")
        full = full.reshape(-1)[:1]
    shard = _tensor_parallel_shard(full, param, key)
    if shard.shape != param.shape:
        raise HFImportError(f"{where}: the Hugging Face tensor gives a shard of shape {tuple(shard.shape)}, "
                           f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(shard.to(param.dtype))


def _persistent_buffers(module) -> list[tuple[str, torch.Tensor]]:
    """Buffers saved with the model (e.g. BHyT's c_attn)."""
    return [(name, buffer) for name, buffer in module.named_buffers()
            if name.rsplit(".", 1)[-1] not in getattr(module.get_submodule(name.rpartition(".")[0]),
                                                     "_non_persistent_buffers_set", ())]


def load_hf_weights(model_chunks, weights: SafetensorsDirectory, hf_config, padded_vocab: int,
                    tie_word_embeddings: bool, tensor_factors: dict[str, float] | None = None) -> int:
    """Copy the HF weights into this rank's Megatron chunks; returns the number of tensors set.
    ``tensor_factors``: the constants the export multiplied into layer tensors (ExportPlan), divided out."""
    from megatron.core.utils import unwrap_model

    from megatron_gpas.model.spec import NORM_KEYS_AS_FUSED

    shape = attention_shape(hf_config)
    count = 0
    for chunk in model_chunks:
        module = unwrap_model(chunk)
        in_layers = set()
        for layer in module.decoder.layers:
            index = layer.layer_number - 1
            prefix = hf_layer_prefix(index)
            hf = {name[len(prefix):]: weights.get(name) for name in weights.names() if name.startswith(prefix)}
            for key, factor in (tensor_factors or {}).items():
                hf[key] = (hf[key].double() / factor).to(hf[key].dtype)
            megatron = layer_from_hf(hf, shape)
            for name, param in (*layer.named_parameters(), *_persistent_buffers(layer)):
                in_layers.add(id(param))
                key = name
                for local, fused in NORM_KEYS_AS_FUSED.items():
                    key = key.replace(local, fused)
                if key not in megatron:
                    raise HFImportError(f"layer {index}: no Hugging Face tensor for the model's {name!r}")
                _copy(param, megatron[key], key, f"layer {index} {name}")
                count += 1
        for name, param in module.named_parameters():
            if id(param) in in_layers:
                continue
            if name in TRANSFORM_TENSORS:
                # exports merge the embedding/head transforms into the tables: identity here
                with torch.no_grad():
                    param.copy_(torch.eye(param.shape[0]) if param.ndim == 2 else torch.ones_like(param))
                count += 1
                continue
            hf_name = GLOBAL_TENSORS.get(name)
            if hf_name is None:
                raise HFImportError(f"no Hugging Face tensor maps to the model's {name!r}")
            if hf_name == "lm_head.weight" and tie_word_embeddings and hf_name not in weights:
                hf_name = "model.embed_tokens.weight"  # a tied head: Megatron's head is untied
            full = weights.get(hf_name)
            if name in VOCAB_TENSORS:
                full = resize_vocab(full, padded_vocab)  # zero rows for Megatron's vocabulary padding
            _copy(param, full, name, name)
            count += 1
    return count


def import_hf_model(hf_dir: str, save_root: str, overrides: list[str] | None = None, *,
                    keep_process_group: bool = False) -> str:
    """Build the model for ``hf_dir`` under the current (torchrun/SLURM or single) process layout,
    copy the weights and save a step-0 checkpoint under ``save_root``; returns its path."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_gpas import checkpoint, distributed
    from megatron_gpas.config import load_tree, config_from_tree, padded_vocab_size
    from megatron_gpas.validation import validate
    from megatron_gpas.model.builder import build_model_chunks, transformer_config
    from megatron_gpas.tokenizer import tokenizer_from_config

    tree = run_tree_from_hf(hf_dir)
    tie = tree.pop("_tie_word_embeddings")
    tree_model_type = tree.pop("_model_type")
    tree["data"] = {"paths": []}
    found = tokenizer_files(hf_dir)
    staged = os.path.join(save_root, "tokenizer")
    if found is not None:  # keep a copy next to the checkpoint: the HF directory may go away
        kind, path = found
        os.makedirs(staged, exist_ok=True)
        target = os.path.join(staged, os.path.basename(path))
        shutil.copy(path, f"{target}.{os.getpid()}.tmp")  # every rank stages it; replace is atomic
        os.replace(f"{target}.{os.getpid()}.tmp", target)
        tree["data"]["tokenizer"] = {"kind": kind, "path": os.path.abspath(os.path.join(staged, os.path.basename(path)))}
    elif not (tree["data"].get("tokenizer") or {}).get("path"):
        tree["data"]["tokenizer"] = {"kind": "null", "vocab_size": tree["model"]["vocab_size"]}
    extra = load_tree(None, overrides)
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    tree.setdefault("checkpoint", {})["save"] = save_root
    cfg = config_from_tree(tree)
    cfg.train.seq_length = min(cfg.train.seq_length, cfg.model.max_seq_length)
    validate(cfg, require_data=False)
    tokenizer = tokenizer_from_config(cfg.data.tokenizer.__dict__)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise HFImportError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                           f"{cfg.model.vocab_size}")
    weights = SafetensorsDirectory(hf_dir)
    if tree_model_type == "llama":
        hf_config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    else:  # our class, from this package (never the directory's code)
        from megatron_gpas.hf.configuration_megatron_gpas import MegatronGPASConfig

        hf_config = MegatronGPASConfig.from_pretrained(hf_dir)

    device = distributed.init_distributed(cfg)
    try:
        on_cpu = device.type == "cpu"
        chunks = build_model_chunks(cfg, transformer_config(cfg, bf16=False, on_cpu=on_cpu))
        factors = SCHEMES[cfg.norm.scheme].export_plan(cfg).tensor_factors if tree_model_type != "llama" else {}
        load_hf_weights(chunks, weights, hf_config, padded_vocab_size(cfg.model, cfg.parallel.tensor), tie, factors)
        path = checkpoint.save(cfg, save_root, 0, chunks, None, None, {"step": 0, "consumed_train_samples": 0})
        if dist.get_rank() == 0:
            print(f"[import] {hf_dir} -> {path} (scheme {cfg.norm.scheme}, gpas {'on' if cfg.gpas.enabled else 'off'})",
                  flush=True)
        return path
    finally:
        distributed.shutdown(keep_process_group=keep_process_group)
