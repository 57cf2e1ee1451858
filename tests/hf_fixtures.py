"""Tiny Hugging Face model directories for tests, built fully offline.

``make_tiny_hf_model_dir(path)`` writes what an exported model directory holds: ``config.json``,
``model.safetensors`` (a randomly initialised 2-layer ``LlamaForCausalLM``) and a byte-level BPE
tokenizer trained here with the ``tokenizers`` library, saved as a ``PreTrainedTokenizerFast``
that prepends ``<s>`` like Llama's. Byte-level means any text (benchmark questions included)
encodes without unknown tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a an of to in on for with what which why how when where who is are was were be can "
    "will would should do does did not no yes true false question answer choose best option "
    "water fire stone wood paper glass metal cup bowl knife spoon door window house car road "
    "tree leaf plant animal dog cat bird fish sun moon rain snow cold hot warm light dark "
    "open close cut fill pour build clean wash dry heat move push pull put take make use"
).split()


def training_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return sentences


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <s>/</s>/<pad>; encode() prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_sentences(3000), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_hf_model_dir(path: str | Path, *, num_layers: int = 2, hidden_size: int = 32, seed: int = 0) -> Path:
    """Write a random tiny LlamaForCausalLM + trained tokenizer to ``path``; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        initializer_range=0.3,  # sharper next-token distributions than 0.02, so log-likelihoods differ
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)  # config.json + model.safetensors
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- export parity

PROBE_SEQ = 16


def probe_megatron(ws: Path, name: str, overrides: list[str], checkpoint: Path) -> dict:
    """One process: the weights of ``checkpoint`` loaded with the run ``overrides`` (any TP layout), their
    logits on a probe batch and their greedy continuation of a prompt (the whole sequence recomputed each step)."""
    import torch
    from test_parallel import _launch

    g = torch.Generator().manual_seed(3)
    probe = {"tokens": torch.randint(0, 256, (2, PROBE_SEQ), generator=g).tolist(),
             "greedy_prompt": torch.randint(0, 256, (1, 5), generator=g).tolist(), "greedy_steps": 6,
             "out": str(ws / "probe.pt")}
    overrides = [*overrides, f"checkpoint.load='{checkpoint}'", "checkpoint.load_optimizer=false",
                 f"checkpoint.save='{ws / (name + '_ckpt')}'"]
    _launch(ws, name, 1, [{"name": "probe", "kind": "save_init", "probe": probe, "overrides": overrides}], timeout=300)
    return torch.load(probe["out"]) | {"probe": probe}


def assert_custom_export_matches(checkpoint: Path, out_dir: Path, megatron_probe: dict) -> None:
    """``checkpoint`` exported to our HF class: logits equal Megatron's within 1e-5 of their scale, greedy
    generation (KV cache) the same tokens."""
    import torch
    from test_model_reference import LOGIT_REL_TOL, assert_rel_close
    from transformers import AutoModelForCausalLM

    from megatron_gpas.hf.export import export_checkpoint

    result = export_checkpoint(str(checkpoint), str(out_dir), progress=False)
    assert result.format == "custom", result.reason
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "MegatronGPASForCausalLM"
    probe = megatron_probe["probe"]
    with torch.no_grad():
        logits = model(torch.tensor(probe["tokens"])).logits
    reference = megatron_probe["logits"]
    assert logits.shape == reference.shape
    assert_rel_close(logits, reference, LOGIT_REL_TOL, "HF logits")
    prompt = torch.tensor(probe["greedy_prompt"])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=probe["greedy_steps"],
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated.tolist() == megatron_probe["greedy"].tolist()
