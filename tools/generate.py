#!/usr/bin/env python
r"""Generate text from a Megatron checkpoint, in any layout, with the checkpoint's own tokenizer.

    python tools/generate.py runs/demo/checkpoints --prompt "To be, or not to be" --max-new-tokens 40
    python tools/generate.py CKPT --prompt-file prompts.txt --temperature 0.8 --top-p 0.9 --seed 1
    torchrun --nproc-per-node 2 tools/generate.py CKPT --prompt "Hello" parallel.tensor=2
    python tools/generate.py SFT_CKPT --chat --system "Be brief." --prompt "What is GPAS?"

CKPT is a checkpoint directory or a save root (its latest checkpoint). The network and the
tokenizer come from its run_config.yaml (the tokenizer from the checkpoint's ``tokenizer/`` copy
when the recorded files are gone); ``key=value`` overrides set the layout (``parallel.tensor=2``,
``parallel.pipeline=2``). Greedy by default (``--temperature 0``); with a temperature, tokens are
drawn after the top-k and top-p (nucleus) cuts, from a generator seeded by ``--seed``, so a run
repeats exactly. Generation stops at the end-of-document token or after ``--max-new-tokens``.

``--chat``: each prompt is a user message (after ``--system``, if given), rendered with the chat
template the checkpoint was fine-tuned with (its ``sft.chat_template``) and tokenized piece by
piece as in training, then the assistant's turn is opened for the model to answer.

Every step recomputes the whole sequence (no KV cache): a tool for checking a model, not a server.
Prints each prompt's continuation; ``--output`` writes them as JSON (ids included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

# Runnable from a checkout without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron_gpas import console  # noqa: E402
from megatron_gpas.checkpoint_paths import CheckpointError  # noqa: E402
from megatron_gpas.config import (ConfigError, config_from_tree, data_parallel_size, load_tree,  # noqa: E402
                                  world_size_from_env)
from megatron_gpas.distributed import launch_rank  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or a save root (its latest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several (one batch)")
    p.add_argument("--prompt-file", help="a UTF-8 file of prompts, one per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user message with the checkpoint's "
                                                        "fine-tuning chat template")
    p.add_argument("--system", help="with --chat: a system message before each prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sampled")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of this probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--output", help="write the prompts and their continuations as JSON to this file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor=2")
    return p.parse_intermixed_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompt-file FILE")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    return prompts


def prompt_ids(args, prompts: list[str], saved: dict, tokenizer) -> list[list[int]]:
    """The token ids of each prompt: its text encoded, or with --chat the rendered conversation."""
    from megatron_gpas.data.instruct import chat_prompt_ids, run_chat_template

    if not args.chat:
        ids = [tokenizer.encode(p) for p in prompts]
    else:
        template = run_chat_template(saved)
        if template is None:
            raise ValueError("--chat: this checkpoint was not fine-tuned on chats (its run_config.yaml has no "
                             "sft.train_files with chat records), so it has no chat template")
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        ids = [chat_prompt_ids([*system, {"role": "user", "content": p}], template, tokenizer) for p in prompts]
    empty = [p for p, i in zip(prompts, ids) if not i]
    if empty:
        raise ValueError(f"prompts that tokenize to no tokens: {empty[:3]}")
    return ids


def build(args, settings):
    """(config, checkpoint dir, tokenizer, prompt texts, prompt ids), everything checked before any
    process group starts."""
    from megatron_gpas.evaluation.loading import checkpoint_tree, forward_only_config
    from megatron_gpas.tokenizer import tokenizer_from_config

    settings.check()
    prompts = read_prompts(args)
    tree, saved, path = checkpoint_tree(args.checkpoint, args.overrides, "generate")
    tokenizer = tokenizer_from_config(tree["data"]["tokenizer"])
    ids = prompt_ids(args, prompts, saved, tokenizer)
    train = tree.setdefault("train", {})
    parallel = config_from_tree(tree).parallel
    needed = max(len(i) for i in ids) + settings.max_new_tokens
    train["seq_length"] = -(-max(needed, (saved.get("train") or {}).get("seq_length") or 0) // parallel.tensor) \
        * parallel.tensor
    dp = data_parallel_size(config_from_tree(tree), world_size_from_env())
    # one micro-batch of all prompts; interleaved pipelining needs parallel.pipeline of them
    micro_batches = parallel.pipeline if parallel.virtual_pipeline > 1 else 1
    train.update(micro_batch_size=len(ids), global_batch_size=len(ids) * max(dp, 1) * micro_batches, steps=1,
                 eval_iters=1, eval_interval=0, exit_after_steps=0)
    return forward_only_config(tree, saved, path, "generate", require_data=False), path, tokenizer, prompts, ids


def main(argv=None) -> int:
    from megatron_gpas.generation import SamplingSettings

    args = parse_args(argv)
    rank0 = launch_rank() == 0
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
    try:
        console.configure(config_from_tree(load_tree(None, args.overrides)).logging.verbose)
        cfg, path, tokenizer, prompts, ids = build(args, settings)
        from megatron_gpas.training import Trainer  # heavy imports after the request is valid

        trainer = Trainer(cfg, data_builder=lambda _: (None, None))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from megatron_gpas.generation import generate

        new = generate(trainer, ids, settings, tokenizer.eod_id)
        if rank0:
            results = []
            for prompt, prompt_tokens, tokens in zip(prompts, ids, new):
                stopped = bool(tokens) and tokens[-1] == tokenizer.eod_id
                text = tokenizer.decode(tokens[:-1] if stopped else tokens)
                results.append({"prompt": prompt, "prompt_ids": prompt_tokens, "new_ids": tokens, "text": text,
                                "stopped_at_eos": stopped})
                print(f"[generate] {prompt!r} -> {text!r}{' <eos>' if stopped else ''}", flush=True)
            if args.output:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                with open(args.output, "w") as f:
                    json.dump({"checkpoint": os.path.abspath(path), "settings": vars(settings), "chat": args.chat,
                               "results": results}, f, indent=2, ensure_ascii=False)
                print(f"[generate] wrote {args.output}", flush=True)
    finally:
        trainer.close()
        if rank0:
            shutil.rmtree(cfg.logging.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
