"""Worker for tests/test_parallel.py: runs several training cases in one (multi-)process job.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json     (or plain python for 1 process)

SPEC.json = {"out": "results_{rank}.json", "cases": [{"name": ..., "kind": ..., ...}, ...]}.
Cases run one after another in the same processes: each builds a Trainer, does its
work and closes it with ``keep_process_group=True`` so the next case reuses the
default (gloo) process group. Every rank writes its own results file; the test compares.

Kinds:
  dataset      write the synthetic indexed dataset at spec["prefix"] (rank 0)
  save_init    build a Trainer and save its (step-0) checkpoint
  train        build a Trainer (resuming per its config) and run ``train()``, recording per
               step: loss, pre-/post-clip norms (``measure_post_clip``) and the gate values α;
               with optim.optimizer=muon also the parameter routing (``routing``)
  expect_error build a Trainer and record the exception it raises (and whether the process
               group existed by then)
  crash_save   simulate a save that dies mid-way and check what a resume picks up
  audit        build a Trainer (no training) and record the sequence-parallel audit and layer structure
  import_hf    import a Hugging Face directory as a checkpoint (tools/convert_from_hf.py's path)

Options of ``train`` cases: ``probe_recompute`` records, for the first step, the forward calls of
each layer part and the bytes autograd saved during the forward (tests/test_recompute.py);
(tests/test_parallel_schemes.py): ``checksums`` adds per-step
parameter checksums to the records (and the post-load ones as ``start_checksums``);
``structure`` records each layer's scheme configuration as built, before any checkpoint
is loaded (so e.g. LNS' 1/√l norm-weight init is still visible).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_gpas import checkpoint, distributed  # noqa: E402
from megatron_gpas.config import load_config  # noqa: E402
from megatron_gpas.training import Trainer  # noqa: E402


def _trainer(overrides: list[str]) -> Trainer:
    """A Trainer that may take over its log folder: the cases of a launch run one after another
    in shared folders, and the tests compare the numbers each case records, not its logs."""
    return Trainer(load_config(None, overrides), force=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _record_steps(trainer: Trainer, checksums: dict | None = None, unit_norms: bool = False) -> list[dict]:
    """Wrap trainer.train_step so every step's numbers are captured on every rank."""
    records: list[dict] = []
    original = trainer.train_step

    def train_step(iterator):
        values = original(iterator)
        result = trainer.last_step_result
        gates = trainer.gate_values()  # collective over PP: every rank runs it (None without GPAS)
        alpha = gates[0].reshape(-1) if gates is not None else []
        records.append({
            "step": trainer.step,
            "loss": values["train/loss"],
            "lr": values["train/lr"],
            "grad_norm": result.grad_norm,
            "gate_grad_norm": result.gate_grad_norm,
            "clipped_grad_norm": result.clipped_grad_norm,
            "clipped_gate_grad_norm": result.clipped_gate_grad_norm,
            "updated": result.updated,
            "alpha": [float(a) for a in alpha],
        })
        if checksums is not None:  # the parameter values when training started
            records[-1]["checksums"] = _param_checksums(trainer, checksums)
        if unit_norms:
            records[-1]["unit_norms"] = _unit_norm_errors(trainer)
        return values

    trainer.train_step = train_step
    return records


# the parts of a layer whose forward calls the recompute probe counts (attribute paths in NormLayer)
PROBED = {"layer": "", "core_attention": "self_attention.core_attention", "mlp": "mlp",
          "input_layernorm": "input_layernorm"}


def _unit_norm_errors(trainer: Trainer) -> dict:
    """This rank's weights the scheme keeps on the unit sphere (``unit_norm_axes``): the largest
    |‖v‖ − 1| of their vectors in the model (with ``unit_norm_clamp``: the largest ‖v‖ − 1, and how
    many vectors lie on the sphere and how many inside), vectors cut by TP measured whole (their
    sums of squares all-reduced over TP); and the largest difference between the optimizer's fp32
    master copy (the distributed optimizer's flat shard, the Float16 optimizer's whole copy) and the
    model's values."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from megatron_gpas.model.schemes import get_scheme

    scheme = get_scheme(trainer.cfg)
    axes = {p: a for chunk in trainer.model for p, a in scheme.unit_norm_axes(unwrap_model(chunk)).items()}
    norms = []
    for p, a in axes.items():
        squares = p.detach().double().pow(2).sum(dim=a)
        if getattr(p, "tensor_model_parallel", False) and p.partition_dim == a:
            torch.distributed.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        norms.append(squares.sqrt())
    norms = torch.cat(norms)
    on_sphere = (norms - 1).abs() < 1e-6
    if scheme.unit_norm_clamp:
        model_error = max(float((norms - 1).max()), 0.0)
    else:
        model_error = float((norms - 1).abs().max())
    master_error, masters, partial = 0.0, 0, 0
    for opt in getattr(trainer.optimizer, "chained_optimizers", None) or [trainer.optimizer]:
        if hasattr(opt, "model_param_gbuf_map"):
            pairs = []
            for model_group, main_group in zip(opt.model_float16_groups + opt.model_fp32_groups,
                                               opt.shard_fp32_from_float16_groups + opt.shard_fp32_groups):
                for param, main in zip(model_group, main_group):
                    r = opt._get_model_param_range_map(param)["param"]
                    pairs.append((param, param.detach().view(-1)[r.start:r.end], main))
                    partial += param in axes and (r.start, r.end) != (0, param.numel())
        else:
            pairs = [(m, m.detach(), main) for mg, fg in zip(getattr(opt, "float16_groups", []),
                                                               getattr(opt, "fp32_from_float16_groups", []))
                     for m, main in zip(mg, fg)]
        for param, model_values, main in pairs:
            if param in axes:
                masters += 1
                master_error = max(master_error, float((main.double().view(-1) - model_values.double().view(-1)).abs().max()))
    return {"model": model_error, "master_vs_model": master_error, "masters": masters,
            "weights": len(axes), "partial_shards": partial, "on_sphere": int(on_sphere.sum()),
            "inside": int((norms < 1 - 1e-4).sum())}


def _probe_first_step(trainer: Trainer) -> dict:
    """Wrap the (already wrapped) train_step so its first call counts the forward calls of each
    PROBED part of this rank's layers and the bytes of the tensors autograd saves outside the
    backward (a recomputation inside the backward saves more, but only for the moment)."""
    from megatron.core.utils import unwrap_model

    probe = {"calls": dict.fromkeys(PROBED, 0), "saved_bytes": 0, "layers": 0}
    handles = []
    for chunk in trainer.model:
        for layer in unwrap_model(chunk).decoder.layers:
            probe["layers"] += 1
            for name, path in PROBED.items():
                module = layer.get_submodule(path)

                def count(*_, name=name):
                    probe["calls"][name] += 1

                handles.append(module.register_forward_pre_hook(count))

    def pack(tensor):
        if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
            probe["saved_bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    original = trainer.train_step

    def first_step(iterator):
        trainer.train_step = original
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                return original(iterator)
        finally:
            for handle in handles:
                handle.remove()

    trainer.train_step = first_step
    return probe


def _checksum(param: torch.Tensor, initial: dict) -> list:
    w = param.detach().double()
    moved = w - initial[id(param)].double() if id(param) in initial else torch.zeros_like(w)
    return [float(w.sum()), float((w * w).sum()), float(w.abs().sum()), float((moved * moved).sum()),
            w.numel(), bool(getattr(param, "tensor_model_parallel", False))]


def _snapshot(trainer: Trainer) -> dict:
    from megatron.core.utils import unwrap_model

    return {id(p): p.detach().clone() for chunk in trainer.model for p in unwrap_model(chunk).parameters()}


def _param_checksums(trainer: Trainer, initial: dict | None = None) -> dict:
    """This rank's share of every parameter, float64: {global name: [Σw, Σw², Σ|w|, Σ(w − w₀)²,
    numel, tensor-parallel?]}, w₀ = ``initial`` (the values when training started).

    Layer parameters are named by the global 1-based layer number (``layer3.mlp...``), so
    the test can merge the ranks of any layout: tensor-parallel shards partition the
    global tensor (sum the TP ranks' values), everything else is replicated over TP.
    Only data-parallel rank 0 reports (DP replicas hold the same values).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if parallel_state.get_data_parallel_rank() != 0:
        return {}
    out: dict = {}
    with torch.no_grad():
        for chunk in trainer.model:
            module = unwrap_model(chunk)
            in_layers = set()
            for layer in module.decoder.layers:
                for name, param in layer.named_parameters():
                    in_layers.add(id(param))
                    out[f"layer{layer.layer_number}.{name}"] = _checksum(param, initial or {})
            for name, param in module.named_parameters():
                if id(param) in in_layers:
                    continue
                out[name] = _checksum(param, initial or {})
    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "values": out}


def _layer_structure(trainer: Trainer) -> dict:
    """How the scheme configured each layer this rank holds, keyed by global layer number."""
    from megatron.core.utils import unwrap_model

    layers: dict = {}
    for chunk in trainer.model:
        for layer in unwrap_model(chunk).decoder.layers:
            slots = []
            for _, norm, residual in layer.sublayers():
                slots.append({
                    "deferred": bool(norm.deferred),
                    "output_scale": float(norm.output_scale),
                    "norm_weight_mean": float(norm.weight.detach().double().mean()),
                    "norm_gate": norm.gate_position,
                    "residual_gate": residual.gate_position,
                    "post_norm": residual._post_norm[0] is norm,
                    "shortcut_scale": float(residual.shortcut_scale),
                    "branch_norm": residual.branch_norm is not None,
                    "sublayer": residual.sublayer,
                    "fused_gate": residual.fused_gate(),  # gpas.fused: the gate computed with the add
                    "norm_fused": bool(getattr(norm, "fused", False)),  # norm.fused (RMSNorm, LayerNorm)
                })
            layers[str(layer.layer_number)] = {
                "slots": slots,
                "gate": layer.gpas is not None,
                "gate_learnable": bool(layer.gpas.alpha.requires_grad) if layer.gpas is not None else None,
            }
    return layers


def _sequence_parallel_audit(trainer: Trainer) -> dict:
    """Parameters that are not tensor-parallel must carry sequence_parallel=True under SP."""
    from megatron.core.utils import unwrap_model

    checked, tensor_parallel, offenders = [], [], []
    for i, chunk in enumerate(trainer.model):
        for name, param in unwrap_model(chunk).named_parameters():
            full = f"chunk{i}.{name}"
            if getattr(param, "tensor_model_parallel", False):
                tensor_parallel.append(full)
                continue
            checked.append(full)
            if getattr(param, "sequence_parallel", False) is not True:
                offenders.append(full)
    return {
        "config_sequence_parallel": bool(trainer.model_config.sequence_parallel),
        "checked": checked,
        "tensor_parallel": tensor_parallel,
        "offenders": offenders,
    }


def run_dataset(case: dict) -> dict:
    """Rank 0 writes the dataset (once per prefix and vocabulary: it is deterministic); the others
    wait for it. Before the first Trainer there is no process group to barrier on, so rank 0 marks
    the finished files with ``PREFIX.ready`` holding the vocabulary size."""
    ready, vocab = case["prefix"] + ".ready", str(case.get("vocab_size", 256))

    def written() -> bool:
        try:
            with open(ready) as f:
                return f.read() == vocab
        except FileNotFoundError:
            return False

    if _rank() == 0 and not written():
        from synthetic import write_synthetic_dataset

        if os.path.exists(ready):
            os.remove(ready)
        write_synthetic_dataset(case["prefix"], vocab_size=int(vocab))
        with open(ready + ".tmp", "w") as f:
            f.write(vocab)
        os.replace(ready + ".tmp", ready)
    deadline = time.monotonic() + 120
    while not written():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {_rank()}: rank 0 did not write the dataset {case['prefix']} within 120 s")
        time.sleep(0.05)
    if dist.is_initialized():
        dist.barrier()
    return {"prefix": case["prefix"]}


def run_save_init(case: dict) -> dict:
    """Save the step-0 checkpoint; options (1 process): ``randomize`` {seed, gates} puts the weights
    in a regime where every parameter matters (test_norm_schemes_reference.perturb; with
    ``zero_final_bias`` the final norm keeps no bias) before saving;
    ``probe`` {tokens, greedy_prompt, greedy_steps, out} saves the model's logits on ``tokens``
    and its greedy continuation of ``greedy_prompt`` (no KV cache) to ``out`` (torch.save)."""
    trainer = _trainer(case["overrides"])
    try:
        if "randomize" in case:
            from megatron.core.utils import unwrap_model
            from test_norm_schemes_reference import perturb

            options = case["randomize"]
            perturb(unwrap_model(trainer.model[0]), options["seed"], options["gates"],
                    zero_final_bias=options.get("zero_final_bias", False))
        trainer.save_checkpoint()
        if "probe" in case:
            torch.save(_probe(trainer, case["probe"]), case["probe"]["out"])
        return {"step": trainer.step, "latest": checkpoint.find_latest(trainer.cfg.checkpoint.save)}
    finally:
        trainer.close(keep_process_group=True)


@torch.no_grad()
def _probe(trainer: Trainer, probe: dict) -> dict:
    from megatron.core.utils import unwrap_model

    model = unwrap_model(trainer.model[0]).eval()
    vocab = trainer.cfg.model.vocab_size  # the padded columns are not part of the model's vocabulary

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return model(tokens, positions, None)[..., :vocab]

    sequence = torch.tensor(probe["greedy_prompt"])
    for _ in range(probe["greedy_steps"]):
        sequence = torch.cat([sequence, logits_of(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {"logits": logits_of(torch.tensor(probe["tokens"])), "greedy": sequence}


def _build_trainer(case: dict, out: dict) -> Trainer:
    """Trainer(...); with ``structure``, the layers are recorded before any checkpoint loads."""
    if not case.get("structure"):
        return _trainer(case["overrides"])
    original = Trainer._maybe_resume

    def maybe_resume(self):
        out["structure"] = _layer_structure(self)
        return original(self)

    Trainer._maybe_resume = maybe_resume
    try:
        return _trainer(case["overrides"])
    finally:
        Trainer._maybe_resume = original


def run_train(case: dict) -> dict:
    out: dict = {}
    trainer = _build_trainer(case, out)
    try:
        out.update({"start_step": trainer.step, "start_consumed": trainer.consumed_train_samples,
                    "world_size": trainer.world_size, "dp": trainer.dp,
                    "num_microbatches": trainer.num_microbatches})
        if case.get("sp_audit"):
            out["sp_audit"] = _sequence_parallel_audit(trainer)
        if trainer.routing is not None:  # optim.optimizer=muon: the whole model's routing
            out["routing"] = {name: route for name, (route, _) in trainer.routing.items()}
        initial = None
        if case.get("checksums"):
            initial = _snapshot(trainer)
            out["start_checksums"] = _param_checksums(trainer)
        trainer.measure_post_clip = True
        out["records"] = _record_steps(trainer, checksums=initial, unit_norms=case.get("unit_norms", False))
        if case.get("probe_recompute"):
            out["probe"] = _probe_first_step(trainer)
        summary = trainer.train()
        out["summary"] = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                          for k, v in summary.items()}
        out["end_step"] = trainer.step
        if trainer.rank0:
            out["history"] = trainer.metrics.history
        return out
    finally:
        trainer.close(keep_process_group=True)


def run_audit(case: dict) -> dict:
    out: dict = {}
    trainer = _build_trainer({**case, "structure": True}, out)
    try:
        out["sp_audit"] = _sequence_parallel_audit(trainer)
        return out
    finally:
        trainer.close(keep_process_group=True)


def run_expect_error(case: dict) -> dict:
    trainer = None
    try:
        trainer = _trainer(case["overrides"])
    except Exception as e:  # noqa: BLE001 - the point is to record it
        # whether it got as far as the process group (validation errors must not)
        process_group = dist.is_initialized()
        distributed.shutdown(keep_process_group=True)
        return {"raised": True, "type": type(e).__name__, "message": str(e), "process_group": process_group}
    trainer.close(keep_process_group=True)
    return {"raised": False}


class SimulatedCrash(BaseException):
    """The process dying mid-save: not an error a save handles (a failed save cleans up after itself;
    a killed process cannot)."""


def run_crash_save(case: dict) -> dict:
    """Resume (at the complete checkpoint's step), then save again with a save that dies
    after writing everything (metadata.json included) but before the rename; plus a junk
    ``.partial`` directory of a later step. Record what find_latest and a resume pick."""
    root = case["root"]
    cfg_overrides = case["overrides"]
    out: dict = {"latest_before": checkpoint.find_latest(root)}
    trainer = _trainer(cfg_overrides)
    try:
        out["resumed_step_before"] = trainer.step
        crash_step = trainer.step + 1
        real_save = checkpoint.dist_checkpointing.save

        def dying_save(state, path, *args, **kwargs):
            real_save(state, path, *args, **kwargs)  # every file written ...
            raise SimulatedCrash("simulated crash during checkpoint save")  # ... but no rename

        checkpoint.dist_checkpointing.save = dying_save
        try:
            checkpoint.save(trainer.cfg, root, crash_step, trainer.model, trainer.optimizer, trainer.scheduler,
                            {"step": crash_step, "consumed_train_samples": 12345})
            out["save_raised"] = None
        except SimulatedCrash as e:
            out["save_raised"] = str(e)
        finally:
            checkpoint.dist_checkpointing.save = real_save
        junk = checkpoint.iteration_dir(root, crash_step + 2) + checkpoint.PARTIAL_SUFFIX
        os.makedirs(junk, exist_ok=True)
        with open(os.path.join(junk, "metadata.json"), "w") as f:
            f.write("{ truncated")
        with open(os.path.join(junk, "garbage.distcp"), "wb") as f:
            f.write(os.urandom(64))
        out["crash_partial"] = checkpoint.iteration_dir(root, crash_step) + checkpoint.PARTIAL_SUFFIX
        out["crash_final"] = checkpoint.iteration_dir(root, crash_step)
        out["listing"] = sorted(os.listdir(root))
        with open(os.path.join(root, checkpoint.LATEST)) as f:
            out["latest_file"] = f.read().strip()
        out["latest_after"] = checkpoint.find_latest(root)
    finally:
        trainer.close(keep_process_group=True)
    # A brand-new trainer resumes from the last complete checkpoint, not the crashed one.
    trainer = _trainer(cfg_overrides)
    try:
        out["resumed_step_after"] = trainer.step
        out["resumed_consumed_after"] = trainer.consumed_train_samples
        # retrying the crashed step's save works and replaces the stale .partial
        checkpoint.save(trainer.cfg, root, crash_step, trainer.model, trainer.optimizer, trainer.scheduler,
                        {"step": crash_step, "consumed_train_samples": trainer.consumed_train_samples})
        out["latest_after_retry"] = checkpoint.find_latest(root)
        out["listing_after_retry"] = sorted(os.listdir(root))
    finally:
        trainer.close(keep_process_group=True)
    return out


def run_import_hf(case: dict) -> dict:
    """tools/convert_from_hf.py's work under this launch's layout (``overrides``)."""
    from megatron_gpas.hf.import_hf import import_hf_model

    return {"path": import_hf_model(case["hf_dir"], case["save"], case["overrides"], keep_process_group=True)}


KINDS = {"dataset": run_dataset, "save_init": run_save_init, "train": run_train,
         "expect_error": run_expect_error, "crash_save": run_crash_save, "audit": run_audit,
         "import_hf": run_import_hf}


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank = _rank()
    results: dict = {"rank": rank, "cases": {}}
    out_path = spec["out"].format(rank=rank)
    try:
        for case in spec["cases"]:
            if rank == 0:
                print(f"[worker] case {case['name']} ({case['kind']})", flush=True)
            started = time.perf_counter()
            results["cases"][case["name"]] = KINDS[case["kind"]](case)
            results["cases"][case["name"]]["seconds"] = time.perf_counter() - started
            gc.collect()  # the case's model and process groups (their gloo threads) go now, not later
            with open(out_path, "w") as f:  # partial results survive a later failure
                json.dump(results, f)
    except BaseException:
        results["error"] = traceback.format_exc()
        with open(out_path, "w") as f:
            json.dump(results, f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
