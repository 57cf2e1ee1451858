"""tools/generate.py: text from a Megatron checkpoint in any layout, and the chat template in exports.

- Greedy tokens under TP=2+SP and PP=2×VP=2 (two gloo processes, torchrun) are those of the checkpoint's
  Hugging Face export run by transformers' own ``generate`` (KV cache, do_sample=False): an
  independent implementation of the model and of the decoding loop.
- Sampling with a seed repeats exactly, another seed draws other tokens; the top-k / top-p cut
  against a hand-computed distribution.
- A checkpoint fine-tuned on chats: ``--chat`` renders the prompt as training did, and the export's
  tokenizer carries the template (``apply_chat_template`` gives the same ids).
- Bad requests fail with a clear message before any process group.

The checkpoint: a tiny randomized model (every parameter matters) whose tokenizer is a
tokenizer.json that encodes like the null tokenizer (whitespace-separated integers), so the
checkpoint carries it and the export has a tokenizer.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import synthetic_run_overrides, write_integer_tokenizer
from test_parallel import _child_env, _free_port, _launch

from megatron_gpas.generation import restrict

REPO = Path(__file__).resolve().parent.parent
GENERATE = REPO / "tools" / "generate.py"
VOCAB = 256
EOD = VOCAB - 1  # the integer tokenizer's "</s>"
GATES = [(0.3, -0.2), (-0.5, 0.6), (0.9, 0.4), (0.1, -0.7)]
# (trailing spaces: transformers tokenizes the rendered text at once, training piece by piece)
TEMPLATE = {"system": "1 {content} 2 ", "user": "3 {content} 2 ", "assistant": "4 {content} 2 "}
PROMPTS = ["5 17 3 99 42", "7 7 8"]


def _overrides(ws: Path, name: str, *extra: str) -> list[str]:
    return ["model.preset=tiny", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=64",
            "train.steps=1", "train.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2",
            "train.eval_iters=1", *synthetic_run_overrides(ws, ws / "runs" / name, vocab_size=VOCAB),
            "data.tokenizer.kind='huggingface'", f"data.tokenizer.path='{ws / 'tokenizer' / 'tokenizer.json'}'",
            *extra]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A randomized pre+GPAS step-0 checkpoint (``ws/ckpt``) with its tokenizer copy."""
    ws = tmp_path_factory.mktemp("generate")
    write_integer_tokenizer(ws / "tokenizer" / "tokenizer.json", VOCAB)
    (ws / "data").mkdir()
    _launch(ws, "checkpoint", 1, [
        {"name": "data", "kind": "dataset", "prefix": str(ws / "data" / "synthetic"), "vocab_size": VOCAB},
        {"name": "ckpt", "kind": "save_init", "randomize": {"seed": 11, "gates": GATES},
         "overrides": _overrides(ws, "ckpt", "gpas.enabled=true", f"checkpoint.save='{ws / 'ckpt'}'")}], timeout=300)
    return ws


def run_generate(ws: Path, name: str, *args: str, nproc: int = 1, expect_rc: int = 0) -> dict | str:
    """tools/generate.py as a user runs it (torchrun for several processes); its JSON output, or
    its stderr when it is expected to fail."""
    out = ws / f"{name}.json"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    proc = subprocess.run([*launcher, str(GENERATE), *args, "--output", str(out)], cwd=REPO,
                          env=_child_env(max(1, 2 // nproc)), capture_output=True, text=True, timeout=300)
    (ws / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == expect_rc, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text()) if expect_rc == 0 else proc.stderr


def _prompt_args(prompts=PROMPTS) -> list[str]:
    return [arg for p in prompts for arg in ("--prompt", p)]


@pytest.fixture(scope="module")
def hf_greedy(ws) -> list[list[int]]:
    """The greedy continuation of each prompt by the checkpoint's HF export (transformers' generate)."""
    from transformers import AutoModelForCausalLM

    from megatron_gpas.hf.export import export_checkpoint

    result = export_checkpoint(str(ws / "ckpt"), str(ws / "hf"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, trust_remote_code=result.format == "custom",
                                                 dtype=torch.float32).eval()
    continuations = []
    for prompt in PROMPTS:
        ids = torch.tensor([[int(t) for t in prompt.split()]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 eos_token_id=EOD, pad_token_id=EOD)
        continuations.append(out[0, ids.shape[1]:].tolist())
    assert all(len(set(c)) > 1 for c in continuations)  # a randomized model: not one token repeated
    return continuations


@pytest.mark.parametrize("layout", [["parallel.tensor=2", "parallel.sequence_parallel=true"],
                                    ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]], ids=["tp2_sp", "pp2_vp2"])
def test_greedy_tokens_are_those_of_the_hf_export(ws, hf_greedy, layout):
    got = run_generate(ws, "_".join(layout), str(ws / "ckpt"), *_prompt_args(), "--max-new-tokens", "10", *layout,
                       nproc=2)
    for prompt, row, hf in zip(PROMPTS, got["results"], hf_greedy):
        assert row["prompt_ids"] == [int(t) for t in prompt.split()]
        assert row["new_ids"] == hf, prompt
        assert row["text"] == " ".join(str(t) for t in hf if t != EOD)


def test_sampling_repeats_with_its_seed(ws):
    sample = ["--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
    first = run_generate(ws, "seed1", str(ws / "ckpt"), *_prompt_args(), *sample, "--seed", "1")
    again = run_generate(ws, "seed1_again", str(ws / "ckpt"), *_prompt_args(), *sample, "--seed", "1")
    other = run_generate(ws, "seed2", str(ws / "ckpt"), *_prompt_args(), *sample, "--seed", "2")
    tokens = [[r["new_ids"] for r in run["results"]] for run in (first, again, other)]
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]
    assert first["settings"] == {"max_new_tokens": 12, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 1}


def test_top_k_and_top_p_cut_as_defined():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda k, p: torch.isfinite(restrict(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(0, 1.0) == [True, True, True, True]
    assert kept(3, 1.0) == [True, True, True, False]
    assert kept(0, 0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(0, 0.8) == [True, True, False, False]  # exactly reached by the first two
    assert kept(0, 0.81) == [True, True, True, False]
    assert kept(0, 0.4) == [True, False, False, False]  # the most probable token always stays
    assert kept(1, 0.9) == [True, False, False, False]
    cut = torch.softmax(restrict(logits, 0, 0.7), -1)[0]
    assert torch.allclose(cut, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0, 0]))
    assert math.isinf(restrict(logits, 2, 1.0)[0, 3])


@pytest.fixture(scope="module")
def sft_checkpoint(ws) -> Path:
    """The checkpoint fine-tuned for 2 steps on chats with an integer chat template."""
    records = [{"messages": [{"role": "user", "content": f"{10 + i} {20 + i}"},
                             {"role": "assistant", "content": f"{30 + i}"}]} for i in range(8)]
    (ws / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    template = "{" + ", ".join(f"{role}: '{text}'" for role, text in TEMPLATE.items()) + "}"
    proc = subprocess.run([
        sys.executable, "-m", "megatron_gpas.finetune", f"checkpoint.pretrained='{ws / 'ckpt'}'",
        f"checkpoint.save='{ws / 'sft'}'", f"sft.train_files=['{ws / 'chats.jsonl'}']", f"sft.chat_template={template}",
        "train.steps=2", "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2",
        "train.eval_interval=0", "optim.warmup_steps=1", f"logging.dir='{ws / 'runs' / 'sft'}'",
        "logging.tensorboard=false", "logging.plots=false"], cwd=REPO, env=_child_env(2), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws / "sft"


def test_chat_prompt_and_export_carry_the_fine_tuning_template(ws, sft_checkpoint):
    from transformers import AutoTokenizer

    from megatron_gpas.hf.export import export_checkpoint

    got = run_generate(ws, "chat", str(sft_checkpoint), "--chat", "--system", "9", "--prompt", "11 21",
                       "--max-new-tokens", "3")
    # system "1 9 2", user "3 11 21 2", then the assistant's opening "4": as training renders a chat
    expected = [1, 9, 2, 3, 11, 21, 2, 4]
    assert got["results"][0]["prompt_ids"] == expected and got["chat"]

    result = export_checkpoint(str(sft_checkpoint), str(ws / "hf_sft"), progress=False)
    assert result.tokenizer["chat_template"] is True
    written = json.loads((Path(result.out_dir) / "tokenizer_config.json").read_text())["chat_template"]
    hf = AutoTokenizer.from_pretrained(result.out_dir)
    assert hf.chat_template == written
    messages = [{"role": "system", "content": "9"}, {"role": "user", "content": "11 21"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == expected
    # a whole chat ends with EOS after the last assistant message, as training's EOD
    chat = [*messages, {"role": "assistant", "content": "31"}]
    assert hf.apply_chat_template(chat, tokenize=False) == "1 9 2 3 11 21 2 4 31</s>"

    # the pretraining checkpoint has no template: its export carries none, and --chat is refused
    plain = export_checkpoint(str(ws / "ckpt"), str(ws / "hf_plain"), progress=False)
    assert plain.tokenizer["chat_template"] is False
    assert AutoTokenizer.from_pretrained(plain.out_dir).chat_template is None
    err = run_generate(ws, "chat_refused", str(ws / "ckpt"), "--chat", "--prompt", "5", expect_rc=2)
    assert "was not fine-tuned on chats" in err


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max new tokens must be at least 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--system", "9"], "--system needs --chat"),
    ([], "no prompt"),
])
def test_bad_requests_fail_before_any_process_group(ws, args, message, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_tool", GENERATE)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prompt = [] if args == [] else ["--prompt", "5 6"]
    assert tool.main([str(ws / "ckpt"), *prompt, *args]) == 2
    assert message in capsys.readouterr().err
