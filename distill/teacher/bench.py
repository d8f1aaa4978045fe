"""Teacher-service benchmark: top-k payload vs full logits, and 2 replicas vs 1 replica throughput.

    unshare -n bash -c 'ip link set lo up && python -m distill.teacher.bench'
    python -m distill.teacher.bench --ray-address auto          # on a running cluster

1. Payload: the service's ``async_topk`` result for k=64 (int32 ids, bf16 log-probs, fp32 tail) vs
   the same positions' full bf16 logits over a 151,936-token vocabulary (Qwen2's), both measured as
   the size of the object in the Ray object store (``ray.experimental.get_object_locations``).
2. Throughput: the same CPU-bound tiny teacher ("teacher" size of distill.models.tiny, 4 layers)
   served by 1 replica, then by 2 replicas (1 stage each, 1 CPU / 1 thread per actor), scoring the
   same requests; tokens/s = scored tokens / wall seconds of one blocking ``topk`` call. Both run
   in this one process, one after the other; the load average is printed because on a shared
   machine other work competes for the cores.

Prints an aligned table; the last line is one JSON document with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _teacher(path: str, vocab: int, size: str, seed: int = 0) -> str:
    from distill.models.tiny import build_tiny_causal_lm

    build_tiny_causal_lm(vocab, size, seed=seed).save_pretrained(path)
    return path


def _seqs(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(n)]


def bench_payload(tmp: str, k: int, vocab: int, n_seqs: int, length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.teacher.ray_service import TeacherService, object_store_bytes, put

    path = _teacher(os.path.join(tmp, "v152k"), vocab, "micro")
    seqs = _seqs(n_seqs, length, vocab)
    poss = [list(range(length)) for _ in seqs]
    svc = TeacherService(path, replicas=1, shards=1)
    try:
        ref = svc.async_topk(seqs, poss, k)
        topk = svc.get(ref)
        topk_bytes = object_store_bytes(ref)
    finally:
        svc.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [model(torch.tensor([s])).logits[0] for s in seqs]
    # Sanity: the service's top-1 is the unsharded model's argmax (fp32) at every position.
    same = sum(int(torch.equal(t.ids[:, 0].long(), lg.argmax(-1))) for t, lg in zip(topk, logits))
    full = [lg.to(torch.bfloat16) for lg in logits]
    del logits
    full_ref = put(full)
    full_bytes = object_store_bytes(full_ref)
    del full, full_ref
    positions = n_seqs * length
    return {"k": k, "vocab": vocab, "positions": positions, "topk_bytes": topk_bytes, "full_bf16_bytes": full_bytes,
            "ratio": full_bytes / topk_bytes, "argmax_agrees_seqs": f"{same}/{len(seqs)}", "topk_bytes_per_position": topk_bytes / positions,
            "full_bytes_per_position": full_bytes / positions}


def bench_replicas(tmp: str, n_seqs: int, length: int, batch: int, repeats: int) -> dict:
    from distill.teacher.ray_service import TeacherService

    vocab = 4096
    path = _teacher(os.path.join(tmp, "cpu_teacher"), vocab, "teacher")
    seqs = _seqs(n_seqs, length, vocab, seed=1)
    poss = [[length - 1] for _ in seqs]  # scoring cost is the forward; the payload stays small
    tokens = n_seqs * length
    # Both services stay up and are timed alternately (1, 2, 1, 2, ...): on a shared machine the
    # load drifts, and alternating exposes both to the same drift.
    svcs = {r: TeacherService(path, replicas=r, shards=1, max_batch_size=batch, num_cpus_per_shard=1) for r in (1, 2)}
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for svc in svcs.values():
            svc.topk(seqs[: 4 * batch], poss[: 4 * batch], 8)  # warm-up (first-call allocations)
        cpu: dict[int, float] = {1: 0.0, 2: 0.0}
        threads = set()

        def actor_cpu(svc):
            us = svc.get([h.usage.remote() for rep in svc.stage_handles() for h in rep])
            threads.update(u["torch_threads"] for u in us)
            return sum(u["cpu_s"] for u in us)

        for _ in range(repeats):
            for r, svc in svcs.items():
                c0 = actor_cpu(svc)
                t0 = time.perf_counter()
                svc.topk(seqs, poss, 8)
                times[r].append(time.perf_counter() - t0)
                cpu[r] += actor_cpu(svc) - c0
        stats = {r: svc.stats() for r, svc in svcs.items()}
    finally:
        for svc in svcs.values():
            svc.shutdown()
    out = {r: {"wall_s": statistics.median(times[r]), "all_wall_s": times[r],
               "tokens_per_s": tokens / statistics.median(times[r]),
               "batches_per_replica": stats[r]["batches_per_replica"],
               # CPU cores the teacher actors actually got while timed (their CPU seconds / wall)
               "actor_cores_used": cpu[r] / sum(times[r])} for r in (1, 2)}
    for r in (1, 2):  # throughput per core the actors actually got: what the replicas scale with
        out[r]["tokens_per_actor_core_s"] = out[r]["tokens_per_s"] / max(out[r]["actor_cores_used"], 1e-9)
    out["torch_threads_per_actor"] = sorted(threads)
    return {"tokens_per_request": tokens, "sequences": n_seqs, "length": length, "batch": batch,
            "one_replica": out[1], "two_replicas": out[2], "torch_threads_per_actor": out["torch_threads_per_actor"],
            "speedup": out[2]["tokens_per_s"] / out[1]["tokens_per_s"],
            "per_core_efficiency": out[2]["tokens_per_actor_core_s"] / out[1]["tokens_per_actor_core_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-address", default=None, help="existing cluster (default: start a loopback one)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--payload-seqs", type=int, default=4)
    ap.add_argument("--payload-len", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=48)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from distill.teacher import ray_service as rs

    load_before = os.getloadavg()
    if args.ray_address:
        rs.connect_ray(args.ray_address)
    else:
        rs.start_local_ray(num_cpus=4, temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pay = bench_payload(tmp, args.k, args.vocab, args.payload_seqs, args.payload_len)
            rep = bench_replicas(tmp, args.seqs, args.len, args.batch, args.repeats)
    finally:
        rs.stop_ray()
    rows = [
        ("top-k payload (k=%d), bytes" % pay["k"], f"{pay['topk_bytes']:,}", f"{pay['topk_bytes_per_position']:.1f} B/pos"),
        ("full bf16 logits (V=%d), bytes" % pay["vocab"], f"{pay['full_bf16_bytes']:,}", f"{pay['full_bytes_per_position']:.0f} B/pos"),
        ("payload ratio full / top-k", f"{pay['ratio']:.0f}x", "target >= 100x"),
        ("1 replica tokens/s", f"{rep['one_replica']['tokens_per_s']:.0f}", f"median of {args.repeats}"),
        ("2 replicas tokens/s", f"{rep['two_replicas']['tokens_per_s']:.0f}", f"split {rep['two_replicas']['batches_per_replica']}"),
        ("speedup 2 / 1 replicas", f"{rep['speedup']:.2f}x", "target >= 1.7x"),
        ("cores used by actors, 1 replica", f"{rep['one_replica']['actor_cores_used']:.2f}", "CPU s / wall s"),
        ("cores used by actors, 2 replicas", f"{rep['two_replicas']['actor_cores_used']:.2f}",
         "2 replicas can only beat 1 with a free core"),
        ("tokens per actor core-second, 2 / 1", f"{rep['per_core_efficiency']:.2f}", "1.0 = no loss from splitting"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, val, note in rows:
        print(f"{name:<{w}}  {val:>14}  {note}")
    result = {"bench": "teacher_service", "cpu_count": os.cpu_count(), "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(), "payload": pay, "replicas": rep}
    print(f"load average before {load_before[0]:.2f}, after {result['load_avg_after'][0]:.2f} on {os.cpu_count()} cores")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
