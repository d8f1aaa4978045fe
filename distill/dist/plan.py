"""Memory and traffic planner for the teacher placement: shapes in, per-GPU bytes out.

    python -m distill.dist.plan --teacher Qwen/Qwen2.5-72B-Instruct --student Qwen/Qwen2.5-1.5B-Instruct \\
        --gpus 16 --gpu-mem 80 [--gpus-per-node 8] [--seq 4096 --micro-batch 1] [--teacher-dtype bf16|int8|int4] [--json]

The command line of the placement model (:mod:`distill.train.placement`, whose docstring says what is
computed and what is estimated): for each teacher placement x student ZeRO stage, the per-GPU memory,
whether it fits ``--gpu-mem``, the collective traffic per optimizer step and the part of it that
crosses nodes, then one recommended placement; ``--config`` plans the run a config describes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

from distill.errors import run_cli
from distill.train.placement import (DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, DEFAULT_TFLOPS, G_BYTES, GB, OPT_BYTES,
                                     QUANT_BYTES, W_BYTES, PlanError, Shape, auto_placement, load_shape, plan,
                                     step_seconds)


def _g(x: float) -> str:
    return f"{x / GB:.1f}"


def format_plan(p: dict) -> str:
    t, s, su = p["teacher"], p["student"], p["setup"]
    lines = [
        f"teacher {t['name']}: {t['params'] / 1e9:.2f}B params (computed), {t['dtype']} weights {_g(t['weight_bytes'])} GB",
        f"student {s['name']}: {s['params'] / 1e9:.2f}B params (computed), bf16 weights {_g(s['weight_bytes'])} GB, "
        f"AdamW states {_g(s['params'] * (W_BYTES + G_BYTES + OPT_BYTES))} GB unpartitioned",
        f"{su['gpus']} GPUs x {su['gpu_mem_gb']:g} GB, {su['gpus_per_node']} per node ({su['nodes']} node(s)); "
        f"seq {su['seq']} x micro-batch {su['micro_batch']}, grad-accum {su['grad_accum']}, attention {su['attn']}; "
        f"reserve {su['reserve_gb']:g} GB/GPU",
        "per-GPU GB; [c] computed from shapes, [e] estimate; comm/gpu, inter-node (all links) and PFLOP (busiest GPU) "
        "per optimizer step; flat ring per collective",
    ]
    est = su.get("step_estimate")
    if est:
        lines.append(f"s/step[e]: an estimate from the PFLOP at {est['tflops']:g} TFLOP/s per GPU plus comm/gpu at "
                     f"{est['intra_gbps']:g} GB/s and inter-node at {est['inter_gbps']:g} GB/s per node, added (no "
                     "overlap assumed); --tflops / --intra-gbps / --inter-gbps change them")
    cols = [("placement", "placement", "s"), ("stage", "zero", "d"), ("student_gpus", "stu gpus", "d"),
            ("teacher_gpus", "tch gpus", "d"), ("student_states", "states[c]", "g"), ("teacher_weights", "teacher[c]", "g"),
            ("gathered", "gather[c]", "g"), ("head", "head[c]", "g"), ("activations", "act[e]", "g"),
            ("activations_ckpt", "act ckpt[e]", "g"), ("teacher_act", "t.act[e]", "g"), ("total", "total", "g"),
            ("total_ckpt", "tot ckpt", "g"), ("fits", "fits", "s"), ("comm_gpu", "comm/gpu[c]", "g"),
            ("internode", "inter-node[c]", "g"), ("flops_gpu", "PFLOP[e]", "p")]
    if p["rows"] and "step_s" in p["rows"][0]:
        cols.append(("step_s", "s/step[e]", "f"))
    cols.append(("note", "note", "s"))
    table = []
    for r in p["rows"]:
        r = {**r, "head": r["head_acc"] + r["head_chunk"]}
        na = r["fits"] == "n/a"
        table.append(["-" if na and (kind in "gpf" or key.endswith("_gpus")) else _g(r[key]) if kind == "g"
                      else f"{r[key] / 1e15:.2f}" if kind == "p" else f"{r[key]:.2f}" if kind == "f"
                      else str(r[key]) for key, _, kind in cols])
    heads = [h for _, h, _ in cols]
    width = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(heads)]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, len(heads) - 1) else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, width))).rstrip()
    lines += ["", fmt(heads), fmt(["-" * w for w in width])]
    prev = None
    for row in table:
        if prev is not None and row[0] != prev:
            lines.append("")
        lines.append(fmt(row))
        prev = row[0]
    ray = next((r for r in p["rows"] if r["placement"] == "ray" and r["fits"] != "n/a"), None)
    if ray:
        lines.append(f"\nray teacher shard: {_g(ray['teacher_shard_mem'])} GB on the largest of {ray['teacher_gpus']} "
                     f"shard GPU(s) (weights [c] + {su['teacher_batch_tokens']}-token forward working set [e])")
    rec = p["recommendation"]
    lines.append("")
    lines.append(f"recommended (auto): {rec['placement']} teacher, student ZeRO-{rec['stage']}: {rec['why']}" if rec
                 else "recommended (auto): none fits; more GPUs, a smaller --micro-batch/--seq, or --teacher-dtype int8/int4")
    if rec and rec["caution"]:
        lines.append(f"note: {rec['caution']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:  # noqa: C901 - flat flag handling
    ap = argparse.ArgumentParser(prog="python -m distill.dist.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="", help="a run config (KnowDist or ICLDist YAML): its teacher, student, sequence "
                    "length, micro-batch, grad-accum, teacher quantization, top-k and ZeRO stage are the defaults, "
                    "and the plan ends with that run's row")
    ap.add_argument("--teacher", default=None, help="hub name of a built-in shape, or a folder with config.json")
    ap.add_argument("--student", default=None, help="hub name of a built-in shape, or a folder with config.json")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU, GB (1e9 bytes)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-batch (default 1)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--teacher-dtype", default=None, choices=list(QUANT_BYTES), help="teacher weights (default bf16)")
    ap.add_argument("--attn", default="flash", choices=["flash", "eager"],
                    help="flash/sdpa keep no [seq x seq] scores; eager does (default flash)")
    ap.add_argument("--topk", type=int, default=None, help="top-k ids the ray teacher returns per token (default 64)")
    ap.add_argument("--teacher-batch-tokens", type=int, default=16384,
                    help="tokens per ray teacher forward (TeacherService max_batch_tokens, default 16384)")
    ap.add_argument("--reserve", type=float, default=6.0,
                    help="GB per GPU held back for the CUDA context, NCCL and DeepSpeed buffers, fragmentation (default 6)")
    ap.add_argument("--intra-gbps", type=float, default=DEFAULT_INTRA_GBPS,
                    help=f"GB/s a GPU sends within a node, for the s/step estimate (default {DEFAULT_INTRA_GBPS:g}, NVLink-class)")
    ap.add_argument("--inter-gbps", type=float, default=DEFAULT_INTER_GBPS,
                    help=f"GB/s per node over the network, for the s/step estimate (default {DEFAULT_INTER_GBPS:g})")
    ap.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                    help=f"bf16 TFLOP/s a GPU sustains, for the s/step estimate (default {DEFAULT_TFLOPS:g})")
    ap.add_argument("--json", action="store_true", help="also print the plan as one JSON document, as the last line")
    a = ap.parse_args(argv)
    for key in ("intra_gbps", "inter_gbps", "tflops"):
        v = getattr(a, key)
        if not (math.isfinite(v) and v > 0):
            raise PlanError(f"--{key.replace('_', '-')} {v}: must be a finite number > 0")
    run = run_settings(a.config) if a.config else {}
    for key, default in (("teacher", None), ("student", None), ("seq", 4096), ("micro_batch", 1), ("grad_accum", 1),
                         ("teacher_dtype", "bf16"), ("topk", 64)):
        if getattr(a, key) is None:
            setattr(a, key, run.get(key, default))
    for key in ("teacher", "student"):
        if not getattr(a, key):
            ap.error(f"--{key} is required (or --config with model.{key})")
    a.run = run
    return a


def run_settings(path: str) -> dict:
    """The planner's inputs from a KnowDist / ICLDist run config (plain YAML; no schema needed):
    models, sequence length, batch, teacher quantization, top-k, ZeRO stage and placement."""
    from distill.config import load_yaml

    d = load_yaml(path)  # a ConfigError naming the file: missing, invalid YAML, a key twice, not a mapping
    check_run_config(d, path)
    sec = lambda name: d.get(name) or {}  # noqa: E731
    model, train, kd, teacher, ds = sec("model"), sec("train"), sec("kd"), sec("teacher"), sec("deepspeed")
    out = {"teacher": model.get("teacher"), "student": model.get("student")}
    seq = sec("icl").get("max_len") or sec("data").get("max_len")
    for key, v in (("seq", seq), ("micro_batch", train.get("micro_batch")), ("grad_accum", train.get("grad_accum")),
                   ("topk", kd.get("topk") or teacher.get("k"))):
        if v:
            out[key] = int(v)
    q = teacher.get("quantization") or ""
    out["teacher_dtype"] = {"": "bf16", "8bit": "int8", "4bit": "int4"}.get(q, "bf16")
    out["placement"] = teacher.get("placement", "auto")
    out["icldist"] = "source" in teacher or any(k in d for k in ("prompts", "icl", "report"))
    if "source" in teacher:  # ICLDist: the teacher is a Ray service, or a cache read with no teacher running
        out["placement"] = "ray"
        out["how"] = ("ICLDist teacher.source=cache: the Ray teacher builds the cache, training reads it"
                      if teacher["source"] == "cache" else "ICLDist teacher.source=online: a Ray service")
    ds_json = Path(ds.get("config") or "ds_configs/zero3.json")
    if not ds_json.is_absolute():
        ds_json = Path(__file__).resolve().parents[2] / ds_json
    stage = ds.get("zero_stage", -1)
    if stage in (-1, None):
        try:
            stage = json.loads(ds_json.read_text(encoding="utf-8"))["zero_optimization"]["stage"]
        except (OSError, KeyError, ValueError, TypeError) as e:
            if ds.get("config"):  # named by the user: its stage is the run's, never a guess
                raise PlanError(f"config file {path}: deepspeed.config {ds_json}: cannot read its "
                                f"zero_optimization.stage ({type(e).__name__}: {e}); fix the file or set "
                                f"deepspeed.zero_stage") from None
            stage = 3  # the shipped default, ds_configs/zero3.json, where the package has no ds_configs/
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"config file {path}: ZeRO stage {stage!r} (deepspeed.zero_stage or the JSON's) must be 0, 1, 2 or 3")
    out["stage"] = int(stage)
    return out


def check_run_config(d: dict, path: str) -> None:
    """The YAML is a run config: its sections and keys those of the ICLDist schema (a file with a
    ``prompts``/``icl``/``report`` section or ``teacher.source``) or else of the KnowDist one (the
    core trainer's plus ``harvest``), with values of the right types; a ConfigError naming the file
    and key otherwise."""
    from distill.config import from_dict

    teacher = d.get("teacher")
    if any(k in d for k in ("prompts", "icl", "report")) or (isinstance(teacher, dict) and "source" in teacher):
        from distill.icldist.config import ICLDistConfig as schema
    else:
        from distill.knowdist.stage import KnowDistConfig as schema
    from_dict(schema, d, where=f"config file {path}:")


def run_line(p: dict, run: dict, config: str) -> str:
    """The row of the run a ``--config`` describes: its placement (``auto`` resolved as the trainer
    resolves it) at its ZeRO stage."""
    su = p["setup"]
    place = run.get("placement", "auto")
    how = run.get("how", "teacher.placement")
    if place == "auto":
        t, s = _shape(p["teacher"]), _shape(p["student"])
        q = {"bf16": "", "int8": "8bit", "int4": "4bit"}[p["teacher"]["dtype"]]
        place, why = auto_placement(t, s, world=su["gpus"], gpus_per_node=su["gpus_per_node"], stage=run["stage"],
                                    gpu_mem=su["gpu_mem_gb"], seq=su["seq"], micro_batch=su["micro_batch"],
                                    grad_accum=su["grad_accum"], quantization=q, topk=su["topk"], partitioned_ok=True)
        how = "auto: " + why.split(" [")[0]
    row = next(r for r in p["rows"] if r["placement"] == place and r["stage"] == run["stage"])
    return (f"config {config}: teacher {place} ({how}), student ZeRO-{run['stage']} on {row['student_gpus']} GPU(s): "
            f"{_g(row['total'])} GB/GPU, {_g(row['total_ckpt'])} with checkpointing [e], fits: {row['fits']}")


def _shape(d: dict) -> Shape:
    return Shape(**{f.name: d[f.name] for f in fields(Shape)})


def _main(argv) -> int:
    a = parse_args(argv)
    p = plan(load_shape(a.teacher), load_shape(a.student), gpus=a.gpus, gpu_mem=a.gpu_mem,
             gpus_per_node=a.gpus_per_node, seq=a.seq, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
             teacher_dtype=a.teacher_dtype, attn=a.attn, topk=a.topk, teacher_batch_tokens=a.teacher_batch_tokens,
             reserve=a.reserve)
    nodes = p["setup"]["nodes"]
    p["setup"]["step_estimate"] = {"intra_gbps": a.intra_gbps, "inter_gbps": a.inter_gbps, "tflops": a.tflops,
                                   "overlap": False}
    for r in p["rows"]:
        r["step_s"] = (None if r["fits"] == "n/a" else
                       step_seconds(r, nodes, intra_gbps=a.intra_gbps, inter_gbps=a.inter_gbps, tflops=a.tflops))
    print(format_plan(p))
    rec = p["recommendation"]
    if rec:
        if a.config and not a.run.get("icldist"):
            print(f"to run it: deepspeed --num_gpus {a.gpus_per_node} launchers/knowdist.py --config {a.config} "
                  f"{rec['overrides']}" + (f" (on each of the {nodes} nodes, as README shows)" if nodes > 1 else ""))
        else:
            print(f"config overrides that realise it: {rec['overrides']}")
    if a.run:
        print(run_line(p, a.run, a.config))
    if a.json:
        print(json.dumps(p))
    return 0


def main(argv=None) -> int:
    """The CLI: a bad flag, --config file or model name is one line on stderr and exit status 2."""
    return run_cli(_main, "python -m distill.dist.plan", argv)


if __name__ == "__main__":
    sys.exit(main())
