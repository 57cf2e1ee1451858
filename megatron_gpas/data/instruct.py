"""Instruction data for supervised fine-tuning: JSONL records → token sequences with loss masks.

One JSON object per line (blank lines are ignored), in one of two formats, recognised per
record (``sft.format: auto``) or forced (``prompt_response`` / ``chat``):

    {"prompt": "...", "response": "..."}              keys: sft.prompt_key, sft.response_key
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   sft.messages_key

Rendering. A prompt/response example is ``prompt + response + EOD``. A chat is one turn per
message, ``sft.chat_template[role]`` with the message in place of ``{content}`` (default
``"<role>: <content>\\n"``), and the end-of-document token in place of the last turn's text
after ``{content}``, so the model learns to end its answer with EOD::

    user: What is 2+2?\\nassistant: 4<EOD>

Each piece (template text, message, prompt, response) is tokenized on its own and the ids
are concatenated, so every token belongs to exactly one piece. Trained on (loss mask 1):
the response, or every assistant message, and the closing EOD. Everything else is context.

Malformed records are skipped for a named reason (``MALFORMED``) and counted, with the
first few ``file:line`` locations per reason; ``sft.strict`` raises at the first one
instead. Examples longer than one sequence (``train.seq_length + 1`` tokens: the inputs
plus the last label) are truncated or skipped (``sft.overlong``) and counted.

Layout (``sft.packing``). Padding: one example per sequence, padded with EOD, padding
masked. Packing: whole examples, in order, fill a sequence until the next one does not fit
(it starts the next sequence; the rest is padded and masked); no example is split.
Attention is causal over the whole sequence and positions run 0..seq_length-1, as in
pretraining; examples are separated by their EOD.

Samples are GPTDataset's dicts (tokens, labels, loss_mask, position_ids) for
``build_loader``: ``tokens = seq[:-1]``, ``labels = seq[1:]``, ``loss_mask[i]`` is 1 when
``labels[i]`` is trained on. The training set repeats for as many epochs as the run
needs, with a new order of the sequences every epoch (``sft.shuffle``).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from megatron_gpas.config import CHAT_ROLES, Config, SFTConfig
from megatron_gpas.data.datasets import PadToLength
from megatron_gpas.tokenizer import Tokenizer

# Skip reasons of malformed records; sft.strict stops at these (not at the other two reasons,
# too_long and no_response_within_sequence, for well-formed examples that do not fit a sequence)
MALFORMED = ("invalid_utf8", "invalid_json", "not_an_object", "missing_key", "wrong_type", "wrong_role",
             "empty_response", "untokenizable")
LOCATIONS_PER_REASON = 5
PROGRESS_SECONDS = 10.0


class InstructDataError(ValueError):
    """A malformed record under ``sft.strict``; the message starts with file:line."""


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    ids: np.ndarray  # int64 token ids, closing EOD included
    targets: np.ndarray  # bool per token: trained on (predicted from the tokens before it)


@dataclass
class ReadReport:
    """What happened to every record of a set of files."""

    files: list[str]
    records: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    locations: dict[str, list[str]] = field(default_factory=dict)  # reason -> first file:line

    def skip(self, reason: str, where: str, message: str) -> None:
        self.skipped[reason] += 1
        self.locations.setdefault(reason, [])
        if len(self.locations[reason]) < LOCATIONS_PER_REASON:
            self.locations[reason].append(f"{where}: {message}")


# ----------------------------------------------------------------------------- records


def render_pieces(record, sft: SFTConfig) -> list[tuple[str, bool]]:
    """The example as (text, trained on) pieces, before the closing EOD (raises _Skip if malformed)."""
    if not isinstance(record, dict):
        raise _Skip("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    kind = sft.format
    if kind == "auto":
        if sft.messages_key in record:
            kind = "chat"
        elif sft.prompt_key in record or sft.response_key in record:
            kind = "prompt_response"
        else:
            raise _Skip("missing_key", f"neither '{sft.messages_key}' nor '{sft.prompt_key}'/'{sft.response_key}' "
                                       f"keys (has {sorted(record)[:5]})")
    if kind == "prompt_response":
        for key in (sft.prompt_key, sft.response_key):
            if key not in record:
                raise _Skip("missing_key", f"missing key '{key}'")
            if not isinstance(record[key], str):
                raise _Skip("wrong_type", f"'{key}' must be a string, got {type(record[key]).__name__}")
        if not record[sft.response_key].strip():
            raise _Skip("empty_response", f"'{sft.response_key}' is empty")
        return [(record[sft.prompt_key], False), (record[sft.response_key], True)]

    if sft.messages_key not in record:
        raise _Skip("missing_key", f"missing key '{sft.messages_key}'")
    messages = record[sft.messages_key]
    if not isinstance(messages, list) or not messages:
        raise _Skip("wrong_type", f"'{sft.messages_key}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Skip("wrong_type", f"message {i} must be an object with 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise _Skip("wrong_role", f"message {i} has role {message['role']!r}; roles: {', '.join(CHAT_ROLES)}")
        if message["role"] == "system" and i > 0:
            raise _Skip("wrong_role", f"message {i}: a system message may only come first")
        if not isinstance(message["content"], str):
            raise _Skip("wrong_type", f"message {i}: 'content' must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise _Skip("empty_response", f"message {i}: empty assistant message")
    if messages[-1]["role"] != "assistant":
        raise _Skip("wrong_role", f"the last message must be the assistant's, got {messages[-1]['role']!r}")
    return _turn_pieces(messages, sft.chat_template, reply=False)


def _turn_pieces(messages: list[dict], template: dict[str, str], reply: bool) -> list[tuple[str, bool]]:
    """(text, trained on) pieces of the turns of ``messages``. ``reply``: every turn closed, then
    the assistant's opening for the model to continue; else the last turn ends open (with EOD)."""
    pieces = []
    for i, message in enumerate(messages):
        before, after = template[message["role"]].split("{content}")
        pieces += [(before, False), (message["content"], message["role"] == "assistant")]
        if reply or i < len(messages) - 1:  # the last turn ends with EOD instead
            pieces.append((after, False))
    if reply:
        pieces.append((template["assistant"].split("{content}")[0], False))
    return pieces


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Each piece tokenized on its own, the ids concatenated (raises _Skip if one is rejected)."""
    ids: list[int] = []
    targets: list[bool] = []
    for text, trained in pieces:
        if not text:
            continue
        try:
            piece = tokenizer.encode(text)
        except (ValueError, TypeError, RuntimeError) as e:
            raise _Skip("untokenizable", f"the tokenizer rejects {text[:40]!r}: {e}") from e
        ids += piece
        targets += [trained] * len(piece)
    return ids, targets


def chat_prompt_ids(messages: list[dict], template: dict[str, str], tokenizer: Tokenizer) -> list[int]:
    """The ids a chat-fine-tuned model continues to answer ``messages`` as the assistant: the
    turns rendered and tokenized piece by piece exactly as in training, then the assistant's
    opening (e.g. ``"assistant: "``)."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES or not isinstance(
                message.get("content"), str):
            raise ValueError(f"message {i} must be an object with a role ({', '.join(CHAT_ROLES)}) and a string "
                             f"content, got {message!r}")
    try:
        return _encode_pieces(_turn_pieces(messages, template, reply=True), tokenizer)[0]
    except _Skip as e:
        raise ValueError(str(e)) from e


def run_chat_template(run_config: dict) -> dict[str, str] | None:
    """The per-role chat template a checkpoint was fine-tuned with (``sft.chat_template`` of its
    run_config.yaml, defaults filled in), or None if it was not fine-tuned on chats."""
    from megatron_gpas.config import DEFAULT_CHAT_TEMPLATE

    sft = run_config.get("sft") or {}
    if not sft.get("train_files") or sft.get("format") == "prompt_response":
        return None
    return {**DEFAULT_CHAT_TEMPLATE, **(sft.get("chat_template") or {})}


def render(record, sft: SFTConfig, tokenizer: Tokenizer) -> Example:
    """Token ids and trained-on flags of one parsed record (raises _Skip if malformed)."""
    ids, targets = _encode_pieces(render_pieces(record, sft), tokenizer)
    if not any(targets):
        raise _Skip("empty_response", "the response tokenizes to no tokens")
    ids.append(tokenizer.eod_id)
    targets.append(True)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool))


def read_examples(files: list[str], sft: SFTConfig, tokenizer: Tokenizer, capacity: int,
                  log: Callable[[str], None] | None = None) -> tuple[list[Example], ReadReport]:
    """Every usable example of ``files`` (in order) and the report of what was skipped.

    ``capacity``: tokens per sequence (train.seq_length + 1); longer examples are truncated
    or skipped per ``sft.overlong``.
    """
    report = ReadReport(files=list(files))
    examples: list[Example] = []
    last_progress = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                report.records += 1
                try:
                    try:
                        text = raw.decode("utf-8").removeprefix("\ufeff")
                    except UnicodeDecodeError as e:
                        raise _Skip("invalid_utf8", f"not UTF-8 ({e.reason} at byte {e.start})") from e
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise _Skip("invalid_json", f"invalid JSON ({e.msg}, column {e.colno})") from e
                    example = render(record, sft, tokenizer)
                    if len(example.ids) > capacity:
                        if sft.overlong == "skip":
                            raise _Skip("too_long", f"{len(example.ids)} tokens > {capacity} per sequence")
                        example = Example(example.ids[:capacity], example.targets[:capacity])
                        if not example.targets[1:].any():
                            raise _Skip("no_response_within_sequence",
                                        f"the prompt alone fills the {capacity} tokens of a sequence")
                        report.truncated += 1
                except _Skip as skip:
                    if sft.strict and skip.reason in MALFORMED:
                        raise InstructDataError(f"{where}: {skip.reason}: {skip} (sft.strict=true)") from None
                    report.skip(skip.reason, where, str(skip))
                    continue
                examples.append(example)
                report.used += 1
                if log is not None and time.perf_counter() - last_progress > PROGRESS_SECONDS:
                    log(f"[sft] reading {path}: {report.records:,} records, {report.used:,} used so far")
                    last_progress = time.perf_counter()
    return examples, report


# ----------------------------------------------------------------------------- layout


@dataclass
class Sequences:
    """Token sequences of at most ``capacity`` tokens, stored ragged: sequence k is
    ``tokens[offsets[k]:offsets[k + 1]]`` with trained-on flags ``targets[...]``."""

    tokens: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    capacity: int
    num_examples: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def loss_tokens(self) -> int:
        """Labels trained on: a sequence's first token is never a label."""
        starts = self.offsets[:-1]
        return int(self.targets.sum() - self.targets[starts].sum())


def layout(examples: list[Example], capacity: int, packing: bool) -> Sequences:
    """Group whole examples into sequences: one each (padding), or in order while they fit (packing)."""
    groups: list[list[Example]] = []
    used = capacity  # forces a new group for the first example
    for example in examples:
        n = len(example.ids)
        if not packing or used + n > capacity:
            groups.append([])
            used = 0
        groups[-1].append(example)
        used += n
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([sum(len(e.ids) for e in group) for group in groups])
    tokens = np.concatenate([e.ids for e in examples]) if examples else np.zeros(0, dtype=np.int64)
    targets = np.concatenate([e.targets for e in examples]) if examples else np.zeros(0, dtype=bool)
    return Sequences(tokens, targets, offsets, capacity, len(examples))


class InstructDataset(torch.utils.data.Dataset):
    """``num_samples`` samples cycling over ``sequences``: epoch e visits every sequence once,
    in a permutation seeded by (seed, e) when shuffling, else in order."""

    def __init__(self, sequences: Sequences, num_samples: int, pad_id: int, *, seed: int, shuffle: bool):
        assert len(sequences) > 0
        self.sequences, self.num_samples, self.pad_id = sequences, num_samples, pad_id
        self.seed, self.shuffle = seed, shuffle
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.num_samples

    def _sequence_index(self, idx: int) -> int:
        epoch, position = divmod(idx, len(self.sequences))
        if not self.shuffle:
            return position
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self._order_epoch = epoch
        return int(self._order[position])

    def __getitem__(self, idx: int) -> dict:
        s = self.sequences
        k = self._sequence_index(idx)
        start, end = s.offsets[k], s.offsets[k + 1]
        seq = np.full(s.capacity, self.pad_id, dtype=np.int64)
        trained = np.zeros(s.capacity, dtype=np.float32)
        seq[:end - start] = s.tokens[start:end]
        trained[:end - start] = s.targets[start:end]
        seq = torch.from_numpy(seq)
        return {
            "tokens": seq[:-1],
            "labels": seq[1:],
            "loss_mask": torch.from_numpy(trained[1:].copy()),
            "position_ids": torch.arange(s.capacity - 1, dtype=torch.int64),
        }


# ----------------------------------------------------------------------------- the run's datasets


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, valid): a seeded random ``fraction`` of the examples (at least one) is held out;
    both keep the file order."""
    n = len(examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"sft.valid_fraction={fraction} of {n} examples leaves no training examples")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _describe(name: str, report: ReadReport | None, sequences: Sequences, packing: bool) -> list[str]:
    lines = []
    if report is not None:
        skipped = sum(report.skipped.values())
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(report.skipped.items())) or "none"
        lines.append(f"[sft] {name}: {len(report.files)} file(s), {report.records:,} records read, "
                     f"{report.used:,} used, {skipped:,} skipped ({reasons}), {report.truncated:,} truncated")
        for reason, where in sorted(report.locations.items()):
            lines += [f"[sft]   {reason}: {w}" for w in where]
    tokens = int(sequences.offsets[-1])
    slots = len(sequences) * sequences.capacity
    loss = sequences.loss_tokens()
    lines.append(f"[sft] {name}: {sequences.num_examples:,} examples -> {len(sequences):,} sequences of "
                 f"{sequences.capacity - 1} tokens ({'packing' if packing else 'padding'}); {tokens:,} tokens, "
                 f"{loss:,} trained on ({100 * loss / max(tokens, 1):.1f}% response), "
                 f"{100 * (1 - tokens / max(slots, 1)):.1f}% padding")
    return lines


@dataclass
class InstructData:
    train: InstructDataset
    valid: torch.utils.data.Dataset | None
    train_report: ReadReport
    valid_report: ReadReport | None
    summary: list[str]  # the lines printed


def build_instruct_datasets(cfg: Config, tokenizer: Tokenizer,
                            log: Callable[[str], None] | None = None) -> InstructData:
    """Read, check and lay out the run's instruction data (sft.*), before any process group.

    The training set is sized for the whole run (train.steps × global batch, as many epochs
    as that takes); the validation set is padded with masked samples to whole global batches.
    """
    sft, t = cfg.sft, cfg.train
    capacity = t.seq_length + 1
    train_examples, train_report = read_examples(sft.train_files, sft, tokenizer, capacity, log)
    if not train_examples:
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(train_report.skipped.items()))
        first = next(iter(train_report.locations.values()), ["-"])[0]
        raise ValueError(f"no usable training examples in sft.train_files ({train_report.records} records read; "
                         f"skipped: {reasons or 'none'}; first: {first})")
    valid_examples, valid_report = [], None
    if sft.valid_files:
        valid_examples, valid_report = read_examples(sft.valid_files, sft, tokenizer, capacity, log)
        if not valid_examples:
            raise ValueError(f"no usable validation examples in sft.valid_files ({valid_report.records} records read)")
    elif sft.valid_fraction > 0:
        train_examples, valid_examples = hold_out(train_examples, sft.valid_fraction, t.seed)
    if sft.shuffle:  # mix the examples that share a packed sequence
        order = np.random.default_rng([t.seed, 1 << 20]).permutation(len(train_examples))
        train_examples = [train_examples[i] for i in order]

    train_sequences = layout(train_examples, capacity, sft.packing)
    num_samples = t.steps * t.global_batch_size
    train = InstructDataset(train_sequences, num_samples, tokenizer.eod_id, seed=t.seed, shuffle=sft.shuffle)
    summary = _describe("train", train_report, train_sequences, sft.packing)
    summary.append(f"[sft] train: {t.steps} steps x {t.global_batch_size} sequences = {num_samples:,} samples "
                   f"= {num_samples / len(train_sequences):.2f} epochs")
    valid = None
    if valid_examples:
        valid_sequences = layout(valid_examples, capacity, sft.packing)
        name = "valid" if sft.valid_files else f"valid (held out {sft.valid_fraction:g} of the training examples)"
        summary += _describe(name, valid_report, valid_sequences, sft.packing)
        exact = InstructDataset(valid_sequences, len(valid_sequences), tokenizer.eod_id, seed=t.seed, shuffle=False)
        batches = math.ceil(len(valid_sequences) / t.global_batch_size)
        valid = PadToLength(exact, batches * t.global_batch_size)
        used = min(batches, t.eval_iters)
        summary.append(f"[sft] valid: {len(valid_sequences):,} sequences = {batches} global batches; each evaluation "
                       f"reads {used} (train.eval_iters={t.eval_iters})")
    if log is not None:
        for line in summary:
            log(line)
    return InstructData(train, valid, train_report, valid_report, summary)
