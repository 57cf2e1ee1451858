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
