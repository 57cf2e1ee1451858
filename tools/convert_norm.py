#!/usr/bin/env python
r"""Convert a checkpoint between the equivalent forms Pre-LN (LayerNorm), Pre-RMSNorm and
Pre-CRMSNorm (Jiang et al., methods.md §3), exactly.

    python tools/convert_norm.py runs/pre_ln/checkpoints runs/pre_rms/checkpoints --to pre_rmsnorm
    python tools/convert_norm.py runs/pre_rms/checkpoints runs/pre_crms/checkpoints --to crmsnorm
    python tools/convert_norm.py runs/pre_crms/checkpoints runs/back/checkpoints --to pre_layernorm

The three forms share their parameters (LayerNorm's γ and β included), so a conversion keeps
every tensor bit for bit and changes the scheme: Pre-RMSNorm and Pre-CRMSNorm train through the
zero-mean reparameterisation (they centre what the embedding and the output projections write),
which is exactly what LayerNorm does not see, so the function is the same (RMSNorm of a zero-mean
vector is LayerNorm with the same ε). GPAS gates are kept. Converting a plain Pre-RMSNorm
(``norm.scheme=pre``, Llama) is refused: its residual stream has a mean that its norms read, so
no LayerNorm form exists.

The output (OUTPUT/iter_0000000) holds the weights only (step 0, the run's config with the new
scheme, the tokenizer copy). Continue training with ``checkpoint.load=OUTPUT
checkpoint.load_optimizer=false``; export with tools/convert_to_hf.py. Extra ``key=value``
arguments are config overrides for the conversion run (e.g. parallel.tensor=2 under torchrun).
"""

import argparse
import copy
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import yaml  # noqa: E402

from megatron_gpas.checkpoint_paths import RUN_CONFIG, CheckpointError, pretrained_checkpoint  # noqa: E402
from megatron_gpas.config import ConfigError, config_from_tree, load_tree  # noqa: E402
from megatron_gpas.hf.tokenizer_export import tokenizer_spec  # noqa: E402
from megatron_gpas.model.schemes.zero_mean import EQUIVALENT_FORMS, equivalent_form  # noqa: E402


def conversion_config(source: str, target: str, output: str, overrides: list[str] | None = None):
    """(config of the converted run, form of the source): the source run's config with the
    target form's norm section, this conversion's overrides, and the source's tokenizer copy."""
    if target not in EQUIVALENT_FORMS:
        raise ConfigError(f"--to must be one of {', '.join(EQUIVALENT_FORMS)}, got {target!r}")
    with open(os.path.join(source, RUN_CONFIG)) as f:
        saved = yaml.safe_load(f) or {}
    src_form = equivalent_form(config_from_tree({k: saved.get(k) or {} for k in ("model", "norm", "gpas")}).norm)
    if src_form is None:
        norm = saved.get("norm") or {}
        raise ConfigError(
            f"{source} holds norm.scheme={norm.get('scheme')} (norm.kind={norm.get('kind', 'rmsnorm')}), which is "
            f"not one of the equivalent forms {', '.join(EQUIVALENT_FORMS)}; a plain Pre-RMSNorm (scheme pre) has a "
            "residual-stream mean its norms read, so it has no exact LayerNorm form")
    tree = {section: copy.deepcopy(saved.get(section) or {}) for section in ("model", "norm", "gpas", "train")}
    tree["norm"].update(EQUIVALENT_FORMS[target])
    tree["gpas"].update(fixed_values=None, freeze=False)
    spec = tokenizer_spec(source, saved, None)
    tree["data"] = {"paths": [], "tokenizer": spec or {"kind": "null", "vocab_size": tree["model"]["vocab_size"]}}
    for section, values in load_tree(None, overrides).items():
        tree.setdefault(section, {}).update(values)
    tree["checkpoint"] = {"save": output}
    tree["logging"] = {"tensorboard": False, "plots": False}
    return config_from_tree(tree), src_form


def convert(source_root: str, output: str, target: str, overrides: list[str] | None = None) -> str:
    import torch.distributed as dist

    from megatron_gpas import checkpoint, distributed
    from megatron_gpas.model.builder import build_model_chunks, transformer_config
    from megatron_gpas.validation import validate

    source = pretrained_checkpoint(source_root, what="source checkpoint")
    cfg, src_form = conversion_config(source, target, output, overrides)
    validate(cfg, require_data=False)
    device = distributed.init_distributed(cfg)
    try:
        chunks = build_model_chunks(cfg, transformer_config(cfg, bf16=False, on_cpu=device.type == "cpu"))
        checkpoint.load(cfg, source, chunks, None, None, load_optimizer=False, check_architecture=False)
        path = checkpoint.save(cfg, output, 0, chunks, None, None, {"step": 0, "consumed_train_samples": 0})
        if dist.get_rank() == 0:
            print(f"[convert_norm] {source} ({src_form}) -> {path} ({target})", flush=True)
        return path
    finally:
        distributed.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint directory, or a save root (its latest checkpoint)")
    p.add_argument("output", help="save root of the converted checkpoint (written as OUTPUT/iter_0000000)")
    p.add_argument("--to", required=True, choices=sorted(EQUIVALENT_FORMS), help="the target form")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        convert(args.source, args.output, args.to, args.overrides)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
