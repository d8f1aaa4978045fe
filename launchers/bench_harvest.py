"""Harvest generation speed, our HF engine against vLLM, on the same teacher, prompts and settings.

    python launchers/bench_harvest.py                         # CPU preset: a tiny random teacher built here
    python launchers/bench_harvest.py --preset gpu-7b         # a lent GPU: Qwen2.5-7B-Instruct in bf16
    python launchers/bench_harvest.py --model PATH --prompts 256 --max-new-tokens 128 --dtype bfloat16

Runs in an environment that has vLLM (``pip install -e '.[vllm]'`` on GPUs; on a CPU the second
environment of docs/teacher.md, "vLLM on a CPU"). Both engines get the same SentiBench texts in the
harvest's prompt template, greedy decoding, and ``--max-new-tokens`` with the end-of-sequence tokens
ignored, so both write exactly the same number of tokens. Each engine is built once (its start is
reported apart), then ``--repeats`` timed generate calls over all prompts; the table gives the median
and the range of the generated tokens per second, and the last line is one JSON document with every row.
Figures from a CPU say so: at the CPU preset's size fixed overheads dominate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/bench_harvest.py: the distill package is not installed; run `pip install -e .` in the repository root")

PRESETS = {
    # A tiny random Llama (head dimension 32: vLLM's CPU attention refuses 16) on a tokenizer trained here.
    "cpu": {"model": "", "prompts": 64, "max_new_tokens": 32, "dtype": "float32", "repeats": 3},
    # What the guide's GPU run measures: a 7B teacher in bf16 (needs the model in the local HF cache).
    "gpu-7b": {"model": "Qwen/Qwen2.5-7B-Instruct", "prompts": 512, "max_new_tokens": 256, "dtype": "bfloat16",
               "repeats": 3},
}


def _tiny_teacher(folder: Path) -> str:
    from distill.data.sentibench import load_texts
    from distill.models.tiny import TinySize, build_tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(load_texts(split="train")[:3000], vocab_size=2048)
    model = build_tiny_causal_lm(len(tok), TinySize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352), seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _prompts(n: int) -> list[str]:
    from distill.data.sentibench import load_texts
    from distill.knowdist.harvest import PerspectiveSection, load_perspectives, make_prompt

    template, persps = load_perspectives(PerspectiveSection())
    texts = load_texts(split="train")
    return [make_prompt("template", template, persps[i % len(persps)], " ".join(texts[i].split()[:60]))
            for i in range(n)]


def _measure(name: str, build, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    import torch

    from distill.teacher.pipeline import SamplingParams

    t0 = time.perf_counter()
    engine = build()
    start_s = time.perf_counter() - t0
    # No token ends an answer early: greedy to the limit, the same token count on both engines.
    engine.info.eos_token_ids = []
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    rates, secs = [], []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gens = engine.generate(prompts, sp)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        secs.append(dt)
        rates.append(sum(len(g.token_ids) for g in gens) / dt)
    engine.shutdown()
    return {"engine": name, "start_s": round(start_s, 2), "prompts": len(prompts),
            "new_tokens": sum(len(g.token_ids) for g in gens), "s_p50": round(statistics.median(secs), 3),
            "tok_s_p50": round(statistics.median(rates), 1), "tok_s_min": round(min(rates), 1),
            "tok_s_max": round(max(rates), 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--model", help="teacher folder or hub name (default: the preset's)")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--max-batch-size", type=int, default=64, help="HF engine: sequences per generate batch")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for key in ("model", "prompts", "max_new_tokens", "dtype", "repeats"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)

    from distill.config import ConfigError, VLLMSection
    from distill.teacher.local import LocalTeacher
    from distill.teacher.vllm_engine import VLLMEngine, require_vllm

    try:
        require_vllm("launchers/bench_harvest.py: engine")
    except ConfigError as e:
        sys.exit(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        model = p["model"] or _tiny_teacher(Path(tmp) / "teacher")
        prompts = _prompts(p["prompts"])
        n = p["max_new_tokens"]
        rows = [
            _measure("hf", lambda: LocalTeacher(model, dtype=p["dtype"], max_batch_size=args.max_batch_size), prompts, n,
                     p["repeats"]),
            _measure("vllm", lambda: VLLMEngine(model, VLLMSection(), dtype=p["dtype"]), prompts, n, p["repeats"]),
        ]
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    ratio = rows[1]["tok_s_p50"] / rows[0]["tok_s_p50"]
    print(f"harvest generation, {p['prompts']} prompts x {n} new tokens, greedy, {p['dtype']}, "
          f"{model if p['model'] else 'tiny random teacher (CPU preset)'}, {device}")
    print(f"{'engine':<8}{'start s':>9}{'s/call p50':>12}{'tok/s p50':>11}{'tok/s min-max':>17}")
    for r in rows:
        print(f"{r['engine']:<8}{r['start_s']:>9.1f}{r['s_p50']:>12.3f}{r['tok_s_p50']:>11.1f}"
              f"{r['tok_s_min']:>9.1f}-{r['tok_s_max']:<7.1f}")
    print(f"vllm / hf generated tokens per second: {ratio:.2f}x")
    print(json.dumps({"bench": "harvest", "preset": args.preset, "device": device, **{k: p[k] for k in p},
                      "rows": rows, "vllm_over_hf": round(ratio, 3)}))


if __name__ == "__main__":
    main()
