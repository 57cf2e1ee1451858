"""Supervised fine-tuning: instruction data (megatron_gpas/data/instruct.py) and the
fine-tuning run (megatron_gpas/finetune.py) on the pretraining trainer.

Data checks use the ``null`` tokenizer (whitespace-separated integer ids; EOD = vocab - 1)
against layouts written out by hand. Training checks run in this process: a 2-step
pretraining run writes the checkpoint every fine-tuning run starts from, then
  * frozen gates stay bit-identical while every other weight moves; gpas.freeze=false moves them;
  * the trainer's loss and gradients over a global batch equal a plain forward with a
    hand-written cross-entropy over the response tokens only (token-weighted over the batch),
    and the prompt positions' labels have no effect on either;
  * an interrupted and resumed fine-tuning run equals the uninterrupted one bit for bit;
  * a moved checkpoint whose run's tokenizer file is gone fine-tunes with the copy inside it.
The pretraining run's tokenizer is a tokenizer.json that encodes like the null tokenizer.
"""

from __future__ import annotations

import json
import re
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.core.utils import unwrap_model

from megatron_gpas import distributed, finetune
from megatron_gpas.config import ConfigError, SFTConfig, load_config
from megatron_gpas.validation import validate
from megatron_gpas.data.instruct import InstructDataError, build_instruct_datasets, read_examples, render_pieces
from megatron_gpas.finetune import build_trainer, load_finetune_config
from megatron_gpas.tokenizer import load_tokenizer
from megatron_gpas.training import Trainer
from process_groups import release_parallel_state
from synthetic import write_integer_tokenizer, write_synthetic_dataset

pytestmark = [
    pytest.mark.usefixtures("parallel_state_released"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

VOCAB = 64
E = VOCAB - 1  # the null tokenizer's EOD
TOKENIZER = load_tokenizer("null", vocab_size=VOCAB)
# integer "role headers" so the null tokenizer can render chats: <header> content 2
INT_TEMPLATE = {"system": "1 {content} 2", "user": "3 {content} 2", "assistant": "4 {content} 2"}
INT_TEMPLATE_OVERRIDE = "sft.chat_template={system: '1 {content} 2', user: '3 {content} 2', assistant: '4 {content} 2'}"
SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
         f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64", "model.max_seq_length=64"]
STEPS = 4


def write_jsonl(path: Path, records: list) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def data_cfg(tmp_path: Path, records: list, *overrides: str):
    """A config whose sft.train_files holds ``records`` (no model needed for the data module)."""
    train = write_jsonl(tmp_path / "train.jsonl", records)
    return load_config(None, [f"sft.train_files=['{train}']", "sft.shuffle=false", "train.seq_length=8",
                              "train.steps=3", "train.global_batch_size=1", "train.micro_batch_size=1", *overrides])


def samples(dataset, n: int | None = None) -> list[dict]:
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(n if n is not None else len(dataset))]


# =========================================================================== data: rendering and masks


def test_prompt_response_sample_against_a_hand_built_layout(tmp_path):
    cfg = data_cfg(tmp_path, [{"prompt": "5 6 7", "response": "8 9"}], "sft.packing=false")
    data = build_instruct_datasets(cfg, TOKENIZER)
    # sequence (9 = seq_length + 1 tokens): 5 6 7 | 8 9 E | pad pad pad; trained on: 8 9 E
    assert samples(data.train, 1)[0] == {
        "tokens": [5, 6, 7, 8, 9, E, E, E],
        "labels": [6, 7, 8, 9, E, E, E, E],
        "loss_mask": [0, 0, 1, 1, 1, 0, 0, 0],  # labels 8, 9 and the closing EOD
        "position_ids": list(range(8)),
    }


def test_chat_sample_against_a_hand_built_layout(tmp_path):
    chat = {"messages": [{"role": "system", "content": "10"}, {"role": "user", "content": "11 12"},
                         {"role": "assistant", "content": "13"}, {"role": "user", "content": "14"},
                         {"role": "assistant", "content": "15 16"}]}
    cfg = data_cfg(tmp_path, [chat], "train.seq_length=16", "sft.packing=false", INT_TEMPLATE_OVERRIDE)
    assert cfg.sft.chat_template == INT_TEMPLATE
    data = build_instruct_datasets(cfg, TOKENIZER)
    # turns "<header> content 2"; the last turn's "2" is replaced by EOD
    ids = [1, 10, 2, 3, 11, 12, 2, 4, 13, 2, 3, 14, 2, 4, 15, 16, E]
    trained = [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1]  # assistant content + EOD only
    sample = samples(data.train, 1)[0]
    assert sample["tokens"] == ids[:-1] and sample["labels"] == ids[1:]
    assert sample["loss_mask"] == trained[1:]


def test_default_chat_rendering_is_role_colon_content_newline():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    pieces = render_pieces({"messages": messages}, SFTConfig())
    assert "".join(text for text, _ in pieces) == \
        "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye\nassistant: Goodbye"  # + EOD
    assert [text for text, trained in pieces if trained] == ["Hello", "Goodbye"]
    pieces = render_pieces({"prompt": "Q: 1+1?\nA:", "response": " 2"}, SFTConfig())
    assert pieces == [("Q: 1+1?\nA:", False), (" 2", True)]


def test_packing_and_padding_layouts(tmp_path):
    records = [{"prompt": "1 2", "response": "3"},  # 4 tokens with EOD
               {"prompt": "4", "response": "5 6"},  # 4
               {"prompt": "7 8", "response": "9 10 11"}]  # 6
    packed = build_instruct_datasets(data_cfg(tmp_path, records, "sft.packing=true"), TOKENIZER)
    # 4 + 4 fit in 9 tokens; the third (6) does not fit after them and starts the next sequence
    assert len(packed.train.sequences) == 2
    assert samples(packed.train, 3) == [
        {"tokens": [1, 2, 3, E, 4, 5, 6, E], "labels": [2, 3, E, 4, 5, 6, E, E],
         "loss_mask": [0, 1, 1, 0, 1, 1, 1, 0], "position_ids": list(range(8))},
        {"tokens": [7, 8, 9, 10, 11, E, E, E], "labels": [8, 9, 10, 11, E, E, E, E],
         "loss_mask": [0, 1, 1, 1, 1, 0, 0, 0], "position_ids": list(range(8))},
        # third sample: the second epoch starts over (no shuffling)
        {"tokens": [1, 2, 3, E, 4, 5, 6, E], "labels": [2, 3, E, 4, 5, 6, E, E],
         "loss_mask": [0, 1, 1, 0, 1, 1, 1, 0], "position_ids": list(range(8))},
    ]
    padded = build_instruct_datasets(data_cfg(tmp_path, records, "sft.packing=false"), TOKENIZER)
    assert len(padded.train.sequences) == 3
    assert [(s["tokens"], s["labels"], s["loss_mask"]) for s in samples(padded.train, 3)] == [
        ([1, 2, 3, E, E, E, E, E], [2, 3, E, E, E, E, E, E], [0, 1, 1, 0, 0, 0, 0, 0]),
        ([4, 5, 6, E, E, E, E, E], [5, 6, E, E, E, E, E, E], [1, 1, 1, 0, 0, 0, 0, 0]),
        ([7, 8, 9, 10, 11, E, E, E], [8, 9, 10, 11, E, E, E, E], [0, 1, 1, 1, 1, 0, 0, 0]),
    ]
    # the summary's counts are those of the layouts
    for data, padding_slots in ((packed, 18 - 14), (padded, 27 - 14)):
        assert data.train.sequences.loss_tokens() == 9
        assert any("14 tokens, 9 trained on" in line for line in data.summary), data.summary
        assert any(f"{100 * padding_slots / (len(data.train.sequences) * 9):.1f}% padding" in line
                   for line in data.summary)


BAD_LINES = [
    json.dumps({"prompt": "1 2", "response": "3"}),  # 1 ok
    '{"prompt": "1", "response": ',  # 2 invalid_json
    "[1, 2]",  # 3 not_an_object
    json.dumps({"prompt": "1"}),  # 4 missing_key
    json.dumps({"text": "1 2"}),  # 5 missing_key
    json.dumps({"prompt": "1", "response": "  "}),  # 6 empty_response
    json.dumps({"prompt": 5, "response": "2"}),  # 7 wrong_type
    json.dumps({"messages": [{"role": "bot", "content": "1"}]}),  # 8 wrong_role
    json.dumps({"messages": [{"role": "user", "content": "1"}]}),  # 9 wrong_role (no assistant at the end)
    json.dumps({"messages": [{"role": "user", "content": "1"}, {"role": "system", "content": "2"},
                             {"role": "assistant", "content": "3"}]}),  # 10 wrong_role (system not first)
    json.dumps({"messages": "hi"}),  # 11 wrong_type
    "",  # 12 blank: not a record
    json.dumps({"prompt": "1", "response": "x"}),  # 13 untokenizable (null tokenizer)
    json.dumps({"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": ""}]}),  # 14 empty
    json.dumps({"messages": [{"role": "user", "content": "5"}, {"role": "assistant", "content": "6"}]}),  # 15 ok
    json.dumps({"prompt": "1 2 3 4 5 6 7 8 9 10", "response": "11"}),  # 16: 12 tokens, the prompt fills 9
    json.dumps({"prompt": "1 2", "response": "3 4 5 6 7 8 9 10"}),  # 17: 11 tokens, truncated to 9
]
EXPECTED_SKIPS = {"invalid_json": [2], "not_an_object": [3], "missing_key": [4, 5], "empty_response": [6, 14],
                  "wrong_type": [7, 11], "wrong_role": [8, 9, 10], "untokenizable": [13]}


def test_bad_records_are_counted_and_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join(BAD_LINES).encode() + b"\n\xff\xfe not utf-8\n")  # line 18
    sft = load_config(None, [INT_TEMPLATE_OVERRIDE]).sft
    examples, report = read_examples([str(path)], sft, TOKENIZER, capacity=9)
    expected = {**EXPECTED_SKIPS, "invalid_utf8": [18], "no_response_within_sequence": [16]}
    assert report.records == 17  # the blank line is not a record
    assert report.used == 3 and len(examples) == 3 and report.truncated == 1
    assert dict(report.skipped) == {reason: len(lines) for reason, lines in expected.items()}
    for reason, lines in expected.items():
        assert [w.split(": ")[0] for w in report.locations[reason]] == [f"{path}:{n}" for n in lines], reason
    truncated = examples[2]  # line 17 cut to 9 tokens: no closing EOD survives
    assert truncated.ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert truncated.targets.tolist() == [False, False] + [True] * 7
    # overlong=skip counts line 16 and line 17 as too long instead
    sft.overlong = "skip"
    _, report = read_examples([str(path)], sft, TOKENIZER, capacity=9)
    assert report.skipped["too_long"] == 2 and report.used == 2 and report.truncated == 0
    assert [w.split(": ")[0] for w in report.locations["too_long"]] == [f"{path}:16", f"{path}:17"]


def test_strict_mode_stops_at_the_first_malformed_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    sft = load_config(None, ["sft.strict=true"]).sft
    with pytest.raises(InstructDataError, match="^" + re.escape(f"{path}:2: invalid_json: invalid JSON")):
        read_examples([path], sft, TOKENIZER, capacity=9)
    # an overlong example is not malformed: strict mode truncates it like the default
    long_only = write_jsonl(tmp_path / "long.jsonl", BAD_LINES[16:17])
    examples, report = read_examples([long_only], sft, TOKENIZER, capacity=9)
    assert report.truncated == 1 and len(examples) == 1


def test_cli_reports_the_bad_line_and_exits_2_before_any_process_group(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    monkeypatch.setattr(distributed, "init_distributed", lambda cfg: pytest.fail("process group started"))
    code = finetune.main([*SHAPE, f"sft.train_files=['{path}']", "sft.strict=true", "data.tokenizer.kind='null'",
                          f"data.tokenizer.vocab_size={VOCAB}", "train.seq_length=8", f"logging.dir='{tmp_path}'"])
    assert code == 2
    assert f"error: {path}:2: invalid_json" in capsys.readouterr().err
    # nothing usable at all: a clear error naming the reasons
    empty = write_jsonl(tmp_path / "empty.jsonl", BAD_LINES[1:3])
    code = finetune.main([*SHAPE, f"sft.train_files=['{empty}']", "data.tokenizer.kind='null'",
                          f"data.tokenizer.vocab_size={VOCAB}", "train.seq_length=8", f"logging.dir='{tmp_path}'"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no usable training examples" in err and "invalid_json 1" in err and "not_an_object 1" in err


def test_epochs_reshuffle_and_held_out_examples(tmp_path):
    records = [{"prompt": str(10 + i), "response": str(30 + i)} for i in range(8)]
    cfg = data_cfg(tmp_path, records, "sft.packing=false", "sft.shuffle=true", "sft.valid_fraction=0.25",
                   "train.steps=6", "train.global_batch_size=4", "train.micro_batch_size=2")
    data = build_instruct_datasets(cfg, TOKENIZER)
    firsts = [s["tokens"][0] for s in samples(data.train)]  # the prompt id names the example
    assert len(firsts) == 24  # 6 steps x 4: four epochs of 6 training sequences
    epochs = [firsts[i:i + 6] for i in range(0, 24, 6)]
    train_ids = sorted(epochs[0])
    assert all(sorted(e) == train_ids for e in epochs)  # every epoch visits every sequence once
    assert len({tuple(e) for e in epochs}) > 1  # in a new order
    valid = samples(data.valid)
    assert len(valid) == 4  # 2 held-out sequences, padded to one global batch of 4
    valid_ids = [s["tokens"][0] for s in valid[:2]]
    assert sorted(train_ids + valid_ids) == list(range(10, 18))  # disjoint, nothing lost
    assert all(sum(s["loss_mask"]) == 0 for s in valid[2:])  # the padding counts for nothing


@pytest.mark.parametrize("overrides, message", [
    (["sft.format=text"], "sft.format must be auto, prompt_response or chat, got 'text'"),
    (["sft.overlong=wrap"], "sft.overlong must be truncate or skip, got 'wrap'"),
    (["sft.valid_fraction=1.0"], "sft.valid_fraction must be in [0, 1), got 1.0"),
    (["sft.valid_fraction=0.1", "sft.valid_files=['{train}']"], "sft.valid_files and sft.valid_fraction are both set"),
    (["sft.chat_template.user='U: '"], "sft.chat_template.user must contain '{content}' exactly once"),
    (["sft.chat_template.bot='{content}'"], "sft.chat_template: unknown role 'bot'"),
    (["sft.train_files=['{train}', '/nonexistent.jsonl']"], "sft.train_files entry not found: /nonexistent.jsonl"),
    (["data.paths=['/x']"], "data.paths (pretraining data) and sft.train_files (fine-tuning data) are both set"),
    (["checkpoint.pretrained=/nonexistent"], "checkpoint.pretrained not found: /nonexistent is not a directory"),
    (["checkpoint.pretrained={tmp}"], "holds no complete checkpoint"),
])
def test_config_validation(tmp_path, overrides, message):
    train = write_jsonl(tmp_path / "train.jsonl", BAD_LINES[:1])
    base = [*SHAPE, f"sft.train_files=['{train}']", "data.tokenizer.kind='null'", f"data.tokenizer.vocab_size={VOCAB}",
            "train.seq_length=16"]
    validate(load_config(None, base), world_size=1)  # valid without the change
    cfg = load_config(None, base + [o.replace("{train}", train).replace("{tmp}", str(tmp_path)) for o in overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    assert message in str(e.value)


def test_pretraining_refuses_a_fine_tuning_config(tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", BAD_LINES[:1])
    monkeypatch.setattr(distributed, "init_distributed", lambda cfg: pytest.fail("process group started"))
    cfg = load_config(None, [*SHAPE, f"sft.train_files=['{train}']", "data.tokenizer.kind='null'",
                             f"data.tokenizer.vocab_size={VOCAB}", "train.seq_length=16"])
    with pytest.raises(ConfigError, match="run it with python -m megatron_gpas.finetune"):
        Trainer(cfg)


# =========================================================================== training


def params(trainer: Trainer) -> dict[str, torch.nn.Parameter]:
    return dict(unwrap_model(trainer.model[0]).named_parameters())


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params(trainer).items()}


def instruction_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response and chat examples of random ids (< 60), 4 to 12 tokens each."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(str(i) for i in rng.integers(5, 60, size=int(rng.integers(lo, hi))))

    records = []
    for i in range(n):
        if i % 3 == 2:
            records.append({"messages": [{"role": "user", "content": text(1, 4)},
                                         {"role": "assistant", "content": text(1, 4)}]})
        else:
            records.append({"prompt": text(2, 6), "response": text(1, 6)})
    return records


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("finetune")
    write_jsonl(ws / "train.jsonl", instruction_records(16))
    return ws


@pytest.fixture(scope="module")
def pretrained(ws) -> dict:
    """A 2-step pretraining run (learnable gates from α = 0.3) and its checkpoint. Its tokenizer
    is a file that encodes like the null tokenizer, so the checkpoint carries a copy of it."""
    write_synthetic_dataset(str(ws / "synthetic"), vocab_size=VOCAB, num_docs=40, doc_len=100)
    tokenizer = write_integer_tokenizer(ws / "tokenizer" / "tokenizer.json", VOCAB)
    release_parallel_state()
    trainer = Trainer(load_config(None, [
        *SHAPE, "gpas.enabled=true", "gpas.init=0.3", "train.steps=2", "train.seq_length=16",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_iters=1", "optim.lr=1.0e-2",
        f"data.paths=['{ws / 'synthetic'}']", "data.tokenizer.kind='huggingface'", f"data.tokenizer.path='{tokenizer}'",
        f"data.cache_dir='{ws / 'data_cache'}'", "data.split='90,10,0'", f"checkpoint.save='{ws / 'pretrain_ckpt'}'",
        f"logging.dir='{ws / 'runs' / 'pretrain'}'", "logging.tensorboard=false", "logging.plots=false"]))
    try:
        trainer.train()
        return {"root": ws / "pretrain_ckpt", "weights": snapshot(trainer), "tokenizer": tokenizer}
    finally:
        trainer.close(keep_process_group=True)


def ft_overrides(ws: Path, run: str, *extra: str) -> list[str]:
    """Only data, batch, optimizer and logging: the network comes from the checkpoint."""
    return [f"checkpoint.pretrained='{ws / 'pretrain_ckpt'}'", f"sft.train_files=['{ws / 'train.jsonl'}']",
            "sft.valid_fraction=0.25", INT_TEMPLATE_OVERRIDE,
            f"train.steps={STEPS}", "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_iters=2", "optim.lr=1.0e-2", "optim.warmup_steps=1", "optim.clip_grad=1.0",
            f"logging.dir='{ws / 'runs' / run}'", "logging.interval=1", "logging.tensorboard=false",
            "logging.plots=false", *extra]


def finetune_trainer(overrides: list[str]) -> Trainer:
    release_parallel_state()
    cfg, source = load_finetune_config(None, overrides)
    return build_trainer(cfg, source)


def run(overrides: list[str]) -> dict:
    trainer = finetune_trainer(overrides)
    try:
        out = {"start": snapshot(trainer), "start_step": trainer.step,
               "requires_grad": {n: p.requires_grad for n, p in params(trainer).items()},
               "train_sequences": len(trainer.train_ds.sequences), "cfg": trainer.cfg}
        out["summary"] = trainer.train()
        out["end"] = snapshot(trainer)
        out["history"] = trainer.metrics.history
        return out
    finally:
        trainer.close(keep_process_group=True)


@pytest.fixture(scope="module")
def reference(ws, pretrained) -> dict:
    """The uninterrupted fine-tuning run (gates frozen by default)."""
    return run(ft_overrides(ws, "reference", f"checkpoint.save='{ws / 'ckpt_reference'}'"))


def is_gate(name: str) -> bool:
    return name.endswith("gpas.alpha")


def test_network_and_tokenizer_come_from_the_checkpoint(ws, pretrained):
    cfg, source = load_finetune_config(None, ft_overrides(ws, "arch"))
    assert source == str(pretrained["root"] / "iter_0000002")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (2, 32, 4, 64)
    assert m.vocab_size == VOCAB
    assert cfg.gpas.enabled and cfg.gpas.init == 0.3 and cfg.gpas.freeze is True  # fine-tuning default
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.path) == ("huggingface", pretrained["tokenizer"])
    assert load_finetune_config(None, ft_overrides(ws, "arch", "gpas.freeze=false"))[0].gpas.freeze is False
    # an explicit value that contradicts the checkpoint is refused, before any process group
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint has 32, config has 48"):
        load_finetune_config(None, ft_overrides(ws, "arch", "model.hidden_size=48", "model.ffn_hidden_size=96"))
    with pytest.raises(ConfigError, match=r"data.paths is pretraining data"):
        load_finetune_config(None, ft_overrides(ws, "arch", f"data.paths=['{ws / 'synthetic'}']"))


def test_fine_tuning_starts_from_the_pretrained_weights(reference, pretrained):
    assert reference["start_step"] == 0
    for name, weight in pretrained["weights"].items():
        assert torch.equal(reference["start"][name], weight), name
    assert [abs(float(v)) > 0.01 for n, v in pretrained["weights"].items() if is_gate(n)] == [True, True]


def test_frozen_gates_stay_bit_identical_while_other_weights_move(reference):
    gates = [n for n in reference["start"] if is_gate(n)]
    assert len(gates) == 2
    for name, start in reference["start"].items():
        if is_gate(name):
            assert reference["requires_grad"][name] is False
            assert torch.equal(reference["end"][name], start), name
        else:
            assert reference["requires_grad"][name] is True
            assert not torch.equal(reference["end"][name], start), f"{name} did not move"
    history = {h["step"]: h for h in reference["history"] if "train/loss" in h}
    assert sorted(history) == list(range(1, STEPS + 1))
    alphas = [[h[f"gpas/alpha/layer_{l}"] for l in (1, 2)] for h in history.values()]
    assert all(a == alphas[0] for a in alphas)


def test_unfrozen_gates_move(ws, pretrained):
    out = run(ft_overrides(ws, "unfrozen", "gpas.freeze=false", "train.steps=2"))
    for name, start in out["start"].items():
        if is_gate(name):
            assert out["requires_grad"][name] is True
            assert not torch.equal(out["end"][name], start), f"{name} did not move with gpas.freeze=false"


def test_runs_several_epochs_and_logs_eval_loss(reference):
    assert STEPS * 4 > reference["train_sequences"]  # more samples than one pass over the data
    evals = [h for h in reference["history"] if "eval/loss" in h]
    assert [h["step"] for h in evals] == [STEPS]
    assert math.isclose(evals[0]["eval/ppl"], math.exp(evals[0]["eval/loss"]), rel_tol=1e-12)
    assert reference["summary"]["eval/loss"] == evals[0]["eval/loss"]


def _global_batch(trainer: Trainer) -> list[dict]:
    """The first global batch as micro-batches (2 × 2 sequences)."""
    rows = [trainer.train_ds[i] for i in range(4)]
    return [{k: torch.stack([r[k] for r in rows[j:j + 2]]) for k in rows[0]} for j in (0, 2)]


def _trainer_loss_and_grads(trainer: Trainer, micro_batches: list[dict]):
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    losses = trainer._run_schedule(iter(micro_batches), forward_only=False)
    grads = {n: p.main_grad.detach().clone() for n, p in params(trainer).items() if p.requires_grad}
    return trainer._reduce_loss(losses), grads


def _reference_loss(model, micro_batches: list[dict]) -> torch.Tensor:
    """Plain forward (logits), cross-entropy by hand, averaged over the response tokens of
    the whole global batch."""
    total, count = 0.0, 0.0
    for mb in micro_batches:
        logits = model(mb["tokens"], mb["position_ids"], None)  # [b, s, vocab]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        nll = -log_probs.gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
        total = total + (nll * mb["loss_mask"].double()).sum()
        count += float(mb["loss_mask"].sum())
    return total / count


def test_loss_and_gradients_cover_response_tokens_only(ws, pretrained):
    trainer = finetune_trainer(ft_overrides(ws, "masking"))
    try:
        batch = _global_batch(trainer)
        counts = [int(mb["loss_mask"].sum()) for mb in batch]
        assert counts[0] != counts[1] and all(0 < c < mb["loss_mask"].numel() for c, mb in zip(counts, batch))
        loss, grads = _trainer_loss_and_grads(trainer, batch)

        # 1. the prompt positions' labels cannot change anything
        rng = torch.Generator().manual_seed(0)
        scrambled = [dict(mb) for mb in batch]
        for mb in scrambled:
            masked = mb["loss_mask"] == 0
            mb["labels"] = torch.where(masked, torch.randint(0, E, mb["labels"].shape, generator=rng), mb["labels"])
        assert any(not torch.equal(a["labels"], b["labels"]) for a, b in zip(scrambled, batch))
        loss2, grads2 = _trainer_loss_and_grads(trainer, scrambled)
        assert loss2 == loss
        assert all(torch.equal(grads2[n], g) for n, g in grads.items())

        # 2. the loss equals an independent masked cross-entropy over the response tokens
        model = unwrap_model(trainer.model[0])
        for chunk in trainer.model:
            chunk.zero_grad_buffer()
        reference_loss = _reference_loss(model, batch)
        assert math.isclose(loss, float(reference_loss), rel_tol=1e-6), (loss, float(reference_loss))
        # ... and so do the gradients: every response token of the global batch weighs the same
        reference_loss.float().backward()  # Megatron's DDP hooks accumulate into main_grad
        for name, grad in grads.items():
            ref = params(trainer)[name].main_grad
            assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7), \
                f"{name}: max |diff| {float((grad - ref).abs().max()):.3e}"
        # (a mean of the two micro-batch means would weigh their tokens differently)
        per_micro_batch = 0.5 * sum(_reference_loss(model, [mb]) for mb in batch)
        assert abs(float(per_micro_batch) - loss) > 1e-4
    finally:
        trainer.close(keep_process_group=True)


def test_resumed_fine_tuning_is_bitwise_identical(ws, reference):
    interrupted = ft_overrides(ws, "part1", f"checkpoint.save='{ws / 'ckpt_resume'}'",
                               f"checkpoint.load='{ws / 'ckpt_resume'}'", "train.exit_after_steps=2")
    part1 = run(interrupted)
    assert part1["summary"].get("stopped_early") is True
    part2 = run([o for o in interrupted if not o.startswith("train.exit_after_steps")])
    assert part2["start_step"] == 2
    # the resumed run carries on from its own checkpoint, not from checkpoint.pretrained
    for name, weight in part1["end"].items():
        assert torch.equal(part2["start"][name], weight), name
    keys = ("train/loss", "train/grad_norm", "train/lr")
    resumed = [{k: h[k] for k in keys} for h in part1["history"] + part2["history"] if "train/loss" in h]
    uninterrupted = [{k: h[k] for k in keys} for h in reference["history"] if "train/loss" in h]
    assert resumed == uninterrupted
    for name, weight in reference["end"].items():
        assert torch.equal(part2["end"][name], weight), f"{name} differs after resume"
    assert part2["summary"]["eval/loss"] == reference["summary"]["eval/loss"]


def test_a_moved_checkpoint_uses_the_tokenizer_copy_inside_it(ws, pretrained, reference, capsys):
    """The pretraining checkpoint copied elsewhere, its run's tokenizer file gone (another
    machine): fine-tuning takes the tokenizer copy inside the checkpoint, says so, and its first
    step is the reference run's."""
    moved = ws / "elsewhere" / "pretrain_ckpt"
    shutil.copytree(pretrained["root"], moved)
    original = Path(pretrained["tokenizer"])
    original.rename(original.with_suffix(".gone"))
    try:
        capsys.readouterr()
        cfg, source = load_finetune_config(None, ft_overrides(ws, "moved", f"checkpoint.pretrained='{moved}'"))
        copy = moved / "iter_0000002" / "tokenizer" / "tokenizer.json"
        assert source == str(moved / "iter_0000002") and cfg.data.tokenizer.path == str(copy)
        note = f"[finetune] tokenizer {original} not found; using the checkpoint's copy {copy}"
        assert note in capsys.readouterr().out
        out = run(ft_overrides(ws, "moved", f"checkpoint.pretrained='{moved}'", "train.exit_after_steps=1"))
    finally:
        original.with_suffix(".gone").rename(original)
    assert out["cfg"].data.tokenizer.path == str(copy)
    for name, weight in pretrained["weights"].items():
        assert torch.equal(out["start"][name], weight), name
    first = [h for h in out["history"] if "train/loss" in h]
    want = [h for h in reference["history"] if "train/loss" in h][:1]
    keys = ("train/loss", "train/grad_norm")
    assert [{k: h[k] for k in keys} for h in first] == [{k: h[k] for k in keys} for h in want]
