"""One KD optimizer step, four ways, on the same batch and models: lean vs logits vs two peers (eager, TRL's fused).

    python launchers/bench_step.py                                        # CPU: tiny Llamas, vocab 151936, both batches (7 min on 2 cores)
    python launchers/bench_step.py --ce-weight 0 --paths lean trl         # KD only, ours against TRL's DistillationTrainer loss
    python launchers/bench_step.py --batch icldist --repeats 3 --paths lean peer
    deepspeed --num_gpus 1 launchers/bench_step.py --engine deepspeed     # the trainer paths through DeepSpeed (1 process, 1 node)
    python launchers/bench_step.py --preset gpu                           # 1 GPU: Qwen2.5-0.5B student, Qwen2.5-7B teacher (random weights), bf16, 8k tokens/step
    srun --gres=gpu:1 --ntasks=1 python launchers/bench_step.py --preset gpu   # the same under SLURM

Paths (each one optimizer step: forward, backward, AdamW, zero_grad; ``--ce-weight`` for all but trl):

* ``lean``: the trainer's ``train_step`` with ``kd.path=lean`` (final hidden states of the
  supervised positions only -> chunked head + CE + KD; no [tokens x V] logits for either model);
* ``logits``: the trainer's ``train_step`` with ``kd.path=logits`` (both models' full HF logits,
  then the chunked loss);
* ``peer``: what a TRL / DistillKit user runs: ``student(**batch)`` (HF's CE from ``labels``) and,
  under ``no_grad``, ``teacher(...).logits``, both full [B, L, V]; shifted, then TRL's
  ``GKDTrainer.generalized_jsd_loss`` (beta=0 is forward KL, beta=1 reverse KL, TRL's convention
  and ours) on the masked logits; ``ce + T^2 * kd``; backward, grad clipping at 1.0 (HF Trainer's
  default), ``torch.optim.AdamW`` step, ``zero_grad``. Without ``trl`` an eager torch copy of that
  loss runs instead and the row says "eager (trl not importable)". The peer always runs plain
  torch, whatever ``--engine`` says.
* ``trl``: TRL >= 1.16's ``DistillationTrainer`` step on the same batch (:func:`_trl_step`): both
  backbones' final hidden states of the completion window, then the trainer's own
  ``_chunked_divergence_loss``, i.e. ``trl/kernels/chunked_divergence.py``'s
  ``ChunkedDivergenceFunction`` (vocabulary tiles of both heads, no [tokens x V] logits; Triton and
  the valid rows only on CUDA, torch tiles over the completion window elsewhere; on these batches the
  window holds only supervised rows, so both project the same rows). KD only: the trainer has no CE
  term, so compare it with ``--ce-weight 0``. HF Trainer's defaults around it: clipping at 1.0,
  ``AdamW(fused=True)``. Without trl >= 1.16 the default run skips it with one line; ``--paths trl``
  then fails. Plain torch, whatever ``--engine`` says.

Batches: ``knowdist`` (default 4 x 256 tokens, the last quarter of each sequence supervised: 25%)
and ``icldist`` (4 x 512 tokens, 2 supervised tokens per sequence: 0.4%).

Method: every (path, batch) runs in a FRESH subprocess. It builds its models, batch and optimizer,
then records the baseline and runs ``--warmup`` + ``--repeats`` steps, timing each (p50 with
p20-p80 of the timed ones). Memory on CPU: the resident-set high-water mark is reset
(``/proc/self/clear_refs``) at the baseline; ``peak+`` = VmHWM at the end - VmRSS at the baseline,
``peak`` = that VmHWM (baseline included); glibc runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
tensors leave the RSS (distill/losses/bench_memory.py). On a GPU: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` at the baseline, and ``peak+`` is above ``memory_allocated`` there.
The baseline is taken before the first step, so ``peak+`` includes the AdamW moments and the
gradients that the first step allocates (the same for every path). The targets: lean ``peak+`` <=
0.15x peer on both batches; lean step time <= 0.25x peer on knowdist, <= 0.1x on icldist; and against
trl, lean <= 0.8x its step time and its ``peak+`` on both batches.

MFU (``--preset gpu``, or any CUDA run) counts the FLOPs the KD step needs, the same number for
every path: ``6 * N_s * tokens + 2 * N_t * tokens`` (N = parameters without the input embedding
and the output head) ``+ 12 * layers_s * hidden_s * seq * tokens + 4 * layers_t * hidden_t * seq *
tokens`` (attention scores and values, training and forward, full S x S as nanoGPT / PaLM count it)
``+ 6 * hidden_s * V_s * sup + 2 * hidden_t * V_t * sup`` (the two heads at the ``sup`` supervised
positions only). Work on unsupervised positions that a path does anyway is not counted.
MFU = FLOPs / p50 step time / ``--peak-tflops`` (default 989: H100/H200 dense bf16).

``--profile N``: after the timed steps, N more under ``torch.profiler`` (CPU activity) with
record_function probes around the step's phases (collation, student forward, the head's loss
chunks, teacher forward, backward, clipping, optimizer, zero_grad + LR; the trainer paths rebuild
their micro-batches as the training loop does); each phase is reported exclusive of the phases
nested in it, ``other`` is the rest of the step (metrics, host syncs, glue), and the operators with
the most self time follow. The profiler's own overhead is in those steps, not in the timed ones.

The table is on stdout; the last line is one JSON document with every row and ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/bench_step.py: the distill package is not installed; run `pip install -e .` in the repository root")

MIB = 2**20
PATHS = ("lean", "logits", "peer", "trl")
PEERS = ("peer", "trl")  # what the trainer paths are divided by
TARGETS = {  # lean / peer at most (issues: the eager peer; TRL's fused DistillationTrainer loss)
    ("peer", "knowdist", "mem"): 0.15, ("peer", "icldist", "mem"): 0.15,
    ("peer", "knowdist", "time"): 0.25, ("peer", "icldist", "time"): 0.10,
    ("trl", "knowdist", "mem"): 0.8, ("trl", "icldist", "mem"): 0.8,
    ("trl", "knowdist", "time"): 0.8, ("trl", "icldist", "time"): 0.8,
}
# Real sizes for --preset gpu (Qwen2.5 config.json values; random weights, no hub).
QWEN_STUDENT = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)  # Qwen2.5-0.5B
QWEN_TEACHER = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)  # Qwen2.5-7B
PRESETS = {  # defaults that a preset sets; explicit flags win
    "cpu": dict(vocab=151936, student_size="64x2", teacher_size="128x2", knowdist="4x256", icldist="4x512",
                dtype="float32"),
    "gpu": dict(vocab=151936, student_size="qwen2.5-0.5b", teacher_size="qwen2.5-7b", knowdist="8x1024",
                icldist="16x512", dtype="bfloat16"),
}


# ------------------------------------------------------------------------------------------------
# Models and batches


def _tiny_size(s: str):
    from distill.models.tiny import TinySize

    h, layers = (int(x) for x in s.split("x"))
    heads = max(1, h // 32)
    return TinySize(hidden=h, layers=layers, heads=heads, kv_heads=max(1, heads // 2), intermediate=int(h * 2.75))


def _qwen_config(base: dict, vocab: int | None, shrink: bool):
    """``Qwen2Config`` of ``base``; ``shrink`` keeps the architecture (GQA, tying, padded teacher
    vocabulary) at toy widths, for a CPU check of this code path."""
    from transformers import Qwen2Config

    kw = dict(base, bos_token_id=0, eos_token_id=1, pad_token_id=2, use_cache=False)
    if shrink:
        kw.update(hidden_size=base["num_attention_heads"] * 4, num_hidden_layers=2, intermediate_size=64)
    if vocab is not None and vocab != QWEN_STUDENT["vocab_size"]:
        kw["vocab_size"] = vocab + (base["vocab_size"] - QWEN_STUDENT["vocab_size"])  # keep the teacher's padding
    return Qwen2Config(**kw)


def build_models(args, work: Path) -> dict:
    """Student and teacher folders (model + the shared tokenizer) under ``work``."""
    import torch

    from distill.models.tiny import build_tiny_causal_lm, train_tokenizer

    tok = train_tokenizer([f"word{i} token{i % 97} sample{i % 13}" for i in range(3000)], vocab_size=1024)
    out = {}
    for name, size, seed in (("teacher", args.teacher_size, 1), ("student", args.student_size, 2)):
        if size.startswith("qwen2.5"):
            from transformers import AutoModelForCausalLM

            base = QWEN_STUDENT if size == "qwen2.5-0.5b" else QWEN_TEACHER
            cfg = _qwen_config(base, args.vocab, args.shrink)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.random.fork_rng(devices=[]), torch.device(dev):
                torch.manual_seed(seed)
                # Built on the GPU in bf16: initialising 7.6B parameters on the host takes minutes.
                m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
        else:
            m = build_tiny_causal_lm(args.vocab, _tiny_size(size), seed=seed)
        m.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        out[name] = str(work / name)
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["id_high"] = len(tok)
    return out


def make_items(kind: str, shape: str, id_high: int) -> list[dict]:
    """Fixed token sequences (seeded); HF-convention labels (-100 = not supervised)."""
    import torch

    b, length = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, id_high, (b, length), generator=g)
    # Supervised positions: the last quarter (knowdist) or the last 2 tokens (icldist) of each row;
    # the first label is never counted (nothing predicts it), so start at >= 1.
    first = length - max(1, length // 4) if kind == "knowdist" else length - 2
    items = []
    for r in ids:
        labels = [-100] * first + r[first:].tolist()
        items.append({"input_ids": r.tolist(), "labels": labels})
    return items


# ------------------------------------------------------------------------------------------------
# The peer's loss


def _trl_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss`` and a label, or None."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for mod in ("trl.experimental.gkd", "trl"):  # moved to trl.experimental in 0.2x
        try:
            m = __import__(mod, fromlist=["GKDTrainer"])
            import trl

            return m.GKDTrainer.generalized_jsd_loss, f"trl {trl.__version__} GKDTrainer.generalized_jsd_loss"
        except Exception:  # noqa: BLE001 - not installed, or an import error of its own
            continue
    return None


def eager_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """TRL's generalized JSD as written there (full-vocabulary log_softmax of both, F.kl_div,
    masked rows, mean over them): the peer's loss when trl is not importable."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
        jsd = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            log_m, log_q, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


def peer_beta(kind: str, beta: float) -> float:
    if kind == "forward_kl":
        return 0.0
    if kind == "reverse_kl":
        return 1.0
    if kind == "jsd":
        return beta
    raise SystemExit(f"--kind {kind}: the peer (TRL's generalized JSD) has forward_kl, reverse_kl and jsd")


# ------------------------------------------------------------------------------------------------
# The worker: one (path, batch) in this (fresh) process


def _q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def _trainer_step(case: dict):
    from distill.config import KDSection, RunConfig, from_dict
    from distill.data.registry import register_dataset
    from distill.train.build import build_trainer

    items = case["items"]
    kd = {"kind": case["kind"], "beta": case["beta"], "temperature": case["temperature"],
          "ce_weight": case["ce_weight"]}
    has_path = "path" in {f.name for f in dataclasses.fields(KDSection)}
    if has_path:
        kd["path"] = case["path"]
    cfg = from_dict(RunConfig, {
        "run": {"out_dir": case["out_dir"]},
        "model": {"student": case["student"], "teacher": case["teacher"], "vocab_size": case["vocab"],
                  "dtype": case["dtype"]},
        "data": {"path": os.path.join(case["out_dir"], "unused.jsonl")},
        "train": {"steps": 10**6, "micro_batch": len(items), "grad_accum": 1, "lr": 1e-4},
        "kd": kd,
        "deepspeed": {"engine": case["engine"], "config": case["ds_config"]},
        "checkpoint": {"export": False},
        "log": {"progress_bar": False},
    })

    class _Fixed:
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    register_dataset("bench_fixed")(lambda cfg, tok, ctx: _Fixed())
    cfg.data.name = "bench_fixed"
    tr = build_trainer(cfg)
    micro = tr.micro_batches(0)  # the whole fixed set, one micro-batch
    impl = f"Trainer.train_step kd.path={case['path']} engine={tr.engine.kind}" if has_path else \
        "Trainer.train_step (this distill has no kd.path)"

    def step():
        return tr.train_step(0, micro)["loss"]  # its one host sync per step is part of the step

    def collated_step():  # --profile: as the training loop calls it, the micro-batches collated again
        return tr.train_step(0, tr.batches.build(0))["loss"]

    import torch

    from distill.dist import engine as dist_engine
    from distill.losses import lean, objective

    step.profiled = collated_step
    step.probes = [(tr.batches, "build", "collate"), (tr.engine, "forward", "student forward"),
                   (dist_engine, "clip_grad_norm", "clip + grad norm"),
                   (lean.LinearDistillFunction, "apply", "head chunks (loss + grads, fwd)"),
                   (objective.DistillObjective, "__call__", "head chunks (loss + grads, fwd)"),
                   (tr.teacher.engine, "final_hidden", "teacher forward"),
                   (tr.teacher.engine, "forward", "teacher forward"),
                   (torch.autograd, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "clip + grad norm"),
                   (tr.engine.optimizer, "step", "optimizer"), (tr.engine.optimizer, "zero_grad", "zero_grad + lr"),
                   (tr.engine.scheduler, "step", "zero_grad + lr")]
    return step, tr.device, impl, (tr.outputs.model_config, tr.teacher.config)


def _peer_step(case: dict):
    import torch

    from distill.data.sft import collate
    from distill.models import load as ml

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, case["dtype"])
    attn = ml.resolve_attn("auto", on_gpu)  # the same attention kernel as the trainer's
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(case["student"], dtype=dtype, attn_implementation=attn).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(case["teacher"], dtype=dtype, attn_implementation=attn).to(device)
    teacher.eval().requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=on_gpu)
    batch = {k: v.to(device) for k, v in collate(case["items"], 2).items() if isinstance(v, torch.Tensor)}
    trl = _trl_loss() if case["peer_loss"] != "eager" else None
    if trl is None and case["peer_loss"] == "trl":
        raise SystemExit("--peer-loss trl: trl is not importable here (pip install trl)")
    loss_fn, impl = trl if trl is not None else (eager_generalized_jsd, "eager (trl not importable)")
    beta = peer_beta(case["kind"], case["beta"])
    T, vocab = case["temperature"], case["vocab"]

    ce_weight = case["ce_weight"]
    ce_labels = batch["labels"] if ce_weight else None  # KD only: no CE for HF to compute
    probe = types.SimpleNamespace(loss=loss_fn)  # where --profile wraps the loss

    def step():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=ce_labels)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Shift as TRL's GKDTrainer.compute_loss does; the real vocabulary only (a padded teacher head).
        kd = probe.loss(out.logits[:, :-1, :vocab], t_logits[:, :-1, :vocab], labels=batch["labels"][:, 1:],
                        beta=beta, temperature=T)
        loss = (ce_weight * out.loss + T**2 * kd) if ce_weight else T**2 * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # read once at the end, not every step

    step.probes = [(student, "forward", "student forward"), (teacher, "forward", "teacher forward"),
                   (probe, "loss", "head chunks (loss, fwd)"), (torch.autograd, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "clip + grad norm"),
                   (opt, "step", "optimizer"), (opt, "zero_grad", "zero_grad + lr")]
    return step, device, f"peer: HF full logits + {impl}", (student.config, teacher.config)


TRL_MIN = (1, 16)  # DistillationTrainer's fused chunked divergence (trl/kernels/chunked_divergence.py)


def trl_status() -> str | None:
    """None when a TRL with the fused DistillationTrainer loss (>= 1.16) can be imported, else why
    not, in a few words. Cheap: the package's metadata, not an import (importing it takes seconds);
    the worker imports it."""
    from importlib import metadata

    if find_spec("trl") is None:
        return "trl is not importable"
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        return "trl is not importable (no package metadata)"
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if nums < TRL_MIN:
        return f"trl {version} predates DistillationTrainer's fused divergence (needs >= {TRL_MIN[0]}.{TRL_MIN[1]})"
    return None


def completion_window(labels, ignore_index: int = -100):
    """``(K, mask [B, K] bool)``: what DistillationTrainer trains on. Its batches are prompt ids then
    completion ids; ``K`` is the completion length (from the first supervised column to the end) and
    ``mask`` the completion mask over those columns, aligned with the hidden states that predict them
    (``hidden[:, :-1][:, -K:]``)."""
    valid = labels[:, 1:] != ignore_index
    cols = valid.any(0).nonzero()
    if cols.numel() == 0:
        raise SystemExit("the trl path needs at least one supervised token in the batch")
    k = valid.shape[1] - int(cols[0])
    return k, valid[:, -k:]


def _trl_step(case: dict):
    """One optimizer step as TRL's DistillationTrainer takes it on a fixed batch: both backbones'
    final hidden states of the completion window (``base_model(...).last_hidden_state[:, :-1][:, -K:]``,
    the teacher under ``no_grad``), then the trainer's own ``_chunked_divergence_loss`` (which calls
    ``ChunkedDivergenceFunction`` on the completion rows: Triton on CUDA with only the valid rows
    projected, torch tiles elsewhere over the whole window), KD only (the trainer has no CE term);
    its entropy metric read with ``.item()`` as ``compute_loss`` does; backward, grad clipping at 1.0,
    ``AdamW(fused=True)`` (HF Trainer's default optimizer with torch >= 2.8, on CPU too), LR
    scheduler step, ``zero_grad``."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.data.sft import collate
    from distill.models import load as ml

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction as trl_loss
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except Exception as exc:  # noqa: BLE001 - the driver checked the metadata; the import itself failed
        raise SystemExit(f"trl path: importing trl's DistillationTrainer loss failed: {exc!r}") from exc

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, case["dtype"])
    attn = ml.resolve_attn("auto", on_gpu)
    student = AutoModelForCausalLM.from_pretrained(case["student"], dtype=dtype, attn_implementation=attn).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(case["teacher"], dtype=dtype, attn_implementation=attn).to(device)
    for m, what in ((student, "student"), (teacher, "teacher")):
        cfg = m.config.get_text_config()
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
            raise SystemExit(f"trl path: the {what} scales or softcaps its logits; this bench passes neither")
    teacher.eval().requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = {k: v.to(device) for k, v in collate(case["items"], 2).items() if isinstance(v, torch.Tensor)}
    k, mask = completion_window(batch["labels"])
    beta = peer_beta(case["kind"], case["beta"])
    T = case["temperature"]
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if s_head.weight.shape[0] != case["vocab"] or t_head.weight.shape[0] < case["vocab"]:
        raise SystemExit(f"trl path: ChunkedDivergenceFunction projects the student's {s_head.weight.shape[0]} head "
                         f"rows; it equals ours only when that is the real vocabulary ({case['vocab']})")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    def step():
        h_s = student.base_model(**inputs).last_hidden_state[:, :-1][:, -k:]
        with torch.no_grad():
            h_t = teacher.base_model(**inputs).last_hidden_state[:, :-1][:, -k:]
        loss, entropy_sum, n_valid = _chunked_divergence_loss(
            h_s, h_t, s_head.weight, t_head.weight, mask, beta, num_items_in_batch=mask.sum().clamp(min=1),
            student_lm_head_bias=s_head.bias, teacher_lm_head_bias=t_head.bias, temperature=T)
        entropy = (entropy_sum / n_valid).item() if n_valid > 0 else 0.0  # compute_loss logs it: a host sync
        del entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.probes = [(student.base_model, "forward", "student forward"), (teacher.base_model, "forward", "teacher forward"),
                   (trl_loss, "apply", "head chunks (loss, fwd)"),
                   (torch.autograd, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "clip + grad norm"),
                   (opt, "step", "optimizer"), (opt, "zero_grad", "zero_grad + lr"), (sched, "step", "zero_grad + lr")]
    where = "valid rows" if on_gpu else f"the {k}-token completion window"
    return step, device, (f"trl {trl.__version__} DistillationTrainer loss: ChunkedDivergenceFunction on {where}, "
                          f"KD only, fused AdamW"), (student.config, teacher.config)


def _body_params(cfg) -> int:
    """Parameters of a Llama / Qwen2 decoder without its input embedding and output head, from
    its config (a ZeRO-3 module's own parameters are partitioned)."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    bias = q + 2 * kv if cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False) else 0
    return layers * (2 * h * q + 2 * h * kv + bias + 3 * h * inter + 2 * h) + h


def step_flops(scfg, tcfg, tokens: int, seq: int, sup: int) -> tuple[float, str]:
    """The KD step's model FLOPs (module docstring) and the formula with its numbers."""
    ns, hs, ls, vs = _body_params(scfg), scfg.hidden_size, scfg.num_hidden_layers, scfg.vocab_size
    nt, ht, lt, vt = _body_params(tcfg), tcfg.hidden_size, tcfg.num_hidden_layers, tcfg.vocab_size
    f = (6 * ns * tokens + 2 * nt * tokens + 12 * ls * hs * seq * tokens + 4 * lt * ht * seq * tokens
         + 6 * hs * vs * sup + 2 * ht * vt * sup)
    return float(f), (f"6*{ns}*{tokens} + 2*{nt}*{tokens} + 12*{ls}*{hs}*{seq}*{tokens} + 4*{lt}*{ht}*{seq}*{tokens}"
                      f" + 6*{hs}*{vs}*{sup} + 2*{ht}*{vt}*{sup}")


_MISSING = object()


def _install_probes(probes, record_function) -> list:
    """Wrap each ``owner.attr`` callable in ``record_function(label)``; returns what undoes it."""
    undo = []
    for owner, attr, label in probes:
        if not hasattr(owner, attr):
            continue
        raw, orig = vars(owner).get(attr, _MISSING), getattr(owner, attr)

        def wrapped(*a, _orig=orig, _label=f"bench:{label}", **k):
            with record_function(_label):
                return _orig(*a, **k)

        setattr(owner, attr, wrapped)
        undo.append((owner, attr, raw))
    return undo


def _uninstall_probes(undo) -> None:
    for owner, attr, raw in reversed(undo):
        if raw is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, raw)


def profile_phases(step, steps: int) -> dict:
    """``steps`` more steps under torch.profiler with the step's probes installed: per phase the
    milliseconds per step EXCLUSIVE of the phases nested in it (the lean head runs inside the
    student forward), ``other`` = the step minus its phases (metrics, host syncs, glue), and the
    operators that take the most self time. CPU activity only (a CUDA run's kernels are asynchronous:
    its phases measure launch and sync points)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    run = getattr(step, "profiled", step)
    undo = _install_probes(getattr(step, "probes", []), record_function)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("bench:step"):
                    run()
    finally:
        _uninstall_probes(undo)
    evs = sorted((e for e in prof.events() if e.name.startswith("bench:")), key=lambda e: (e.time_range.start,
                                                                                         -e.time_range.end))
    excl: dict[str, float] = {}
    for i, e in enumerate(evs):
        dur, kids, reach = e.time_range.end - e.time_range.start, 0.0, e.time_range.start
        for c in evs[i + 1:]:
            if c.thread != e.thread or c.time_range.start < reach:
                continue  # another thread, or nested in a child already counted
            if c.time_range.start >= e.time_range.end:
                break
            kids += c.time_range.end - c.time_range.start
            reach = c.time_range.end
        name = "other (metrics, host syncs, glue)" if e.name == "bench:step" else e.name[len("bench:"):]
        excl[name] = excl.get(name, 0.0) + (dur - kids) / 1e3 / steps
    total = sum(excl.values())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"steps": steps, "step_ms": total,
            "phases": [{"phase": k, "ms": v, "share": v / total if total else None}
                       for k, v in sorted(excl.items(), key=lambda kv: -kv[1])],
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
                        for e in ops if not e.key.startswith("bench:")][:10]}


def worker(case: dict) -> dict:
    import gc

    import torch

    from distill_kernels.bench.harness import proc_status_bytes, reset_hwm

    torch.manual_seed(0)
    step, device, impl, configs = {"peer": _peer_step, "trl": _trl_step}.get(case["path"], _trainer_step)(case)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    sync()
    base = peak = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif reset_hwm():
        base = proc_status_bytes()["VmRSS"]
    times, last = [], None
    for r in range(case["warmup"] + case["repeats"]):
        sync()
        t0 = time.perf_counter()
        last = step()
        sync()
        if r >= case["warmup"]:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif base is not None:
        peak = proc_status_bytes()["VmHWM"]
    prof = profile_phases(step, case["profile"]) if case.get("profile") else None
    items = case["items"]
    tokens = sum(len(it["input_ids"]) for it in items)
    sup = sum(sum(1 for x in it["labels"][1:] if x != -100) for it in items)
    seq = max(len(it["input_ids"]) for it in items)
    flops, formula = step_flops(*configs, tokens, seq, sup)
    p50 = statistics.median(times)
    return {
        "path": case["path"], "batch": case["batch"], "impl": impl, "device": str(device),
        "tokens": tokens, "supervised": sup, "seq": seq,
        "p50_ms": 1e3 * p50, "p20_ms": 1e3 * _q(times, 0.2), "p80_ms": 1e3 * _q(times, 0.8),
        "tok_s": tokens / p50,
        "memory": "cuda max_memory_allocated" if cuda else "VmHWM (RSS high-water mark)",
        "baseline_mib": None if base is None else base / MIB,
        "peak_extra_mib": None if peak is None else (peak - base) / MIB,
        "peak_mib": None if peak is None else peak / MIB,
        "loss": float(last),
        "flops": flops, "flops_formula": formula,
        "mfu": flops / p50 / (case["peak_tflops"] * 1e12) if cuda else None,
        "repeats": len(times), "warmup": case["warmup"], "profile": prof,
    }


# ------------------------------------------------------------------------------------------------
# The driver


def run_case(case: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed blocks >= 64 KiB leave the RSS (bench_memory.py)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.get("WORLD_SIZE", "1") == "1":
        env.pop("MASTER_PORT", None)  # each child takes a free port: no wait on the previous one's
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"path": case["path"], "batch": case["batch"], "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"path": case["path"], "batch": case["batch"], "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    row = json.loads(last)
    row["process_s"] = wall
    return row


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="sizes and dtype (flags below win)")
    ap.add_argument("--batch", default="both", choices=["knowdist", "icldist", "both"])
    ap.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                    help="default: all (trl skipped with one line where trl >= 1.16 is not importable)")
    ap.add_argument("--vocab", type=int, default=None, help="student vocabulary (preset: 151936)")
    ap.add_argument("--student-size", default=None, help="hidden x layers, or qwen2.5-0.5b (preset)")
    ap.add_argument("--teacher-size", default=None, help="hidden x layers, or qwen2.5-7b (preset)")
    ap.add_argument("--knowdist", default=None, help="sequences x tokens of the knowdist batch, last 25%% supervised")
    ap.add_argument("--icldist", default=None, help="sequences x tokens of the icldist batch, 2 supervised per sequence")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="weights and compute (preset)")
    ap.add_argument("--shrink", action="store_true", help=argparse.SUPPRESS)  # qwen presets at toy widths (tests)
    ap.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--beta", type=float, default=0.5, help="jsd only (0 = forward KL, 1 = reverse KL)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=1.0,
                    help="CE weight of lean, logits and peer (0 = KD only, as the trl path always is)")
    ap.add_argument("--peer-loss", default="auto", choices=["auto", "trl", "eager"],
                    help="the peer's KD loss: TRL's when importable (auto), TRL's or fail, or the eager copy")
    ap.add_argument("--engine", default="torch", choices=["torch", "deepspeed"], help="the trainer paths' engine")
    ap.add_argument("--ds-config", default="ds_configs/zero3.json")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per (path, batch)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then N more steps under torch.profiler: each row's step broken down by phase")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100/H200 dense bf16: 989)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per (path, batch) process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("bench_step measures one process: run it with --num_gpus 1 (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']})")
    skipped = {}
    if args.paths is None:
        args.paths = list(PATHS)
        why = trl_status() if "trl" in args.paths else None
        if why:
            args.paths.remove("trl")
            skipped["trl"] = why
            print(f"trl: skipped ({why}; pip install 'trl>=1.16' to compare with TRL's fused DistillationTrainer loss)",
                  flush=True)
    elif "trl" in args.paths and (why := trl_status()):
        raise SystemExit(f"bench_step.py: error: --paths trl: {why}; pip install 'trl>=1.16'")
    t_start = time.perf_counter()
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    try:
        return _run(args, work, t_start, torch, skipped)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the gpu preset's folders hold 16 GB


def _run(args, work: Path, t_start: float, torch, skipped: dict) -> int:
    folders = build_models(args, work)
    batches = ["knowdist", "icldist"] if args.batch == "both" else [args.batch]
    rows = []
    for b in batches:
        items = make_items(b, getattr(args, b), folders["id_high"])
        for p in args.paths:
            case = {"path": p, "batch": b, "items": items, "student": folders["student"], "teacher": folders["teacher"],
                    "vocab": args.vocab, "dtype": args.dtype, "kind": args.kind, "beta": args.beta,
                    "temperature": args.temperature, "ce_weight": args.ce_weight, "peer_loss": args.peer_loss, "engine": args.engine, "ds_config": args.ds_config,
                    "repeats": args.repeats, "warmup": args.warmup, "profile": args.profile,
                    "peak_tflops": args.peak_tflops,
                    "out_dir": str(work / f"run_{b}_{p}")}
            row = run_case(case, args.timeout)
            print(f"[bench_step] {b:<9} {p:<7} " + (row["error"] if "error" in row else
                  f"p50 {row['p50_ms']:.0f} ms, peak+ {_f(row['peak_extra_mib'], '.0f')} MiB "
                  f"({row['process_s']:.0f} s)"), file=sys.stderr, flush=True)
            rows.append(row)
    ratios = []
    for b in batches:
        by = {r["path"]: r for r in rows if r["batch"] == b and "error" not in r}
        for q in PEERS:
            peer = by.get(q)
            for p in ("lean", "logits") if q == "peer" else ("lean",):
                if p not in by or peer is None:
                    continue
                r = {"batch": b, "what": f"{p}/{q}",
                     "time": _ratio(by[p]["p50_ms"], peer["p50_ms"]),
                     "mem_extra": _ratio(by[p]["peak_extra_mib"], peer["peak_extra_mib"]),
                     "mem_total": _ratio(by[p]["peak_mib"], peer["peak_mib"])}
                if p == "lean":
                    for key, what in (("time", "time"), ("mem_extra", "mem")):
                        tgt = TARGETS[(q, b, what)]
                        r[f"{key}_target"] = tgt
                        r[f"{key}_ok"] = None if r[key] is None else r[key] <= tgt
                ratios.append(r)
    wall = time.perf_counter() - t_start
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device={dev} preset={args.preset} engine={args.engine} dtype={args.dtype} vocab={args.vocab} "
          f"student={args.student_size} teacher={args.teacher_size} kind={args.kind} T={args.temperature} "
          f"ce_weight={args.ce_weight} repeats={args.repeats} warmup={args.warmup} torch={torch.__version__}")
    gpu = any(r.get("mfu") is not None for r in rows)
    head = (f"{'batch':<9}{'path':<8}{'tokens':>7}{'sup':>6}{'p50 ms':>10}{'(p20-p80)':>19}{'tok/s':>10}"
            f"{'base MiB':>10}{'peak+ MiB':>11}{'peak MiB':>10}" + (f"{'MFU%':>7}" if gpu else "") + "  impl")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:<9}{r['path']:<8}  FAILED: {r['error']}")
            continue
        print(f"{r['batch']:<9}{r['path']:<8}{r['tokens']:>7}{r['supervised']:>6}{r['p50_ms']:>10.1f}"
              f"{'(' + format(r['p20_ms'], '.1f') + '-' + format(r['p80_ms'], '.1f') + ')':>19}{r['tok_s']:>10.0f}"
              f"{_f(r['baseline_mib'], '.0f'):>10}{_f(r['peak_extra_mib'], '.0f'):>11}{_f(r['peak_mib'], '.0f'):>10}"
              + (f"{_f(None if r['mfu'] is None else 100 * r['mfu'], '.1f'):>7}" if gpu else "") + f"  {r['impl']}")
    print(f"\n{'batch':<9}{'ratio':<13}{'time':>8}{'target':>9}{'peak+':>8}{'target':>9}{'peak':>8}")
    for r in ratios:
        def tgt(key):
            if f"{key}_target" not in r:
                return ""
            ok = r[f"{key}_ok"]
            return f"<={r[f'{key}_target']:.2f}" + ("" if ok is None else (" ok" if ok else " MISS"))
        print(f"{r['batch']:<9}{r['what']:<13}{_f(r['time'], '.3f'):>8}{tgt('time'):>9}"
              f"{_f(r['mem_extra'], '.3f'):>8}{tgt('mem_extra'):>9}{_f(r['mem_total'], '.3f'):>8}")
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        print(f"\nstep breakdown, {r['batch']} {r['path']} (torch.profiler, {prof['steps']} steps; ms per step, "
              f"exclusive of nested phases; profiled step {prof['step_ms']:.1f} ms)")
        for ph in prof["phases"]:
            print(f"  {ph['phase']:<36}{ph['ms']:>9.1f}{100 * (ph['share'] or 0):>7.1f}%")
        print("  top ops (self ms per step): " + ", ".join(f"{o['op']} {o['self_ms']:.1f}" for o in prof["top_ops"][:6]))
    print(f"memory: {rows[0].get('memory', '-') if rows else '-'}; peak+ above the baseline (models, batch and "
          f"optimizer built), peak = the high-water mark; fresh process per row; whole run {wall:.0f} s")
    failed = [r for r in rows if "error" in r]
    print(json.dumps({"bench": "launchers/bench_step.py", "device": dev, "date": time.strftime("%Y-%m-%d"),
                      "torch": torch.__version__,
                      "args": {k: v for k, v in vars(args).items() if k != "worker"},
                      "rows": rows, "ratios": ratios, "skipped": skipped, "wall_s": wall}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
