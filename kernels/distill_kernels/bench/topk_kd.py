"""Benchmark topk_kd: ``python -m distill_kernels.bench.topk_kd [--kind forward_kl] [--k 64]``.

Providers: torch (eager, as users write top-k KD: fp32 log_softmax of the student, gather the k
ids, plus the tail bucket of kernels/distill_kernels/ref.py's definition; forward KL only), ref (kernels/distill_kernels/ref.py topk_kd_ref,
every kind), triton (distill_kernels.topk_kd). Liger-Kernel has no top-k op. "fwd" is the
training forward (student requires grad), "fwd+bwd" adds backward.
Minimal traffic used for GB/s: read the student logits once (fwd); + write the gradient
(fwd+bwd); the k ids / log-probs are negligible next to the vocabulary.
"""

from __future__ import annotations

from distill_kernels.bench import harness as H  # sets TRITON_INTERPRET on CPU first

import torch  # noqa: E402


def eager_topk_forward_kl(s, ids, lps, tail, labels, temperature):
    """Forward KL over the k ids and the tail bucket (the same quantity as the kernel)."""
    log_q_all = torch.log_softmax(s.float() / temperature, dim=-1)
    log_q = log_q_all.gather(-1, ids.long())
    q_tail = (1 - log_q.exp().sum(-1)).clamp_min(1e-30)  # as eager code writes it: cancels when confident
    p = lps.float().exp()
    per = (p * (lps.float() - log_q)).sum(-1) + tail * (tail.clamp_min(1e-30).log() - q_tail.log())
    mask = labels != -100
    return (per * mask).sum() / mask.sum().clamp_min(1)


def main(argv=None):
    p = H.base_parser(__doc__.splitlines()[0])
    p.add_argument("--kind", default="forward_kl",
                   choices=["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--k", type=int, default=64)
    args = p.parse_args(argv)
    env = H.make_env(args.device)
    small = args.small or env.device == "cpu"
    tokens = args.tokens or ([256, 1024] if small else [1024, 4096, 16384])
    vocabs = args.vocab or ([32000, 128256] if small else [32000, 128256, 152064])
    reps = args.reps or (3 if env.device == "cpu" else 20)
    dtype = H.DTYPES[args.dtype]
    dev = env.device

    from distill_kernels.ref import topk_kd_ref
    from distill_kernels.topk_kd import topk_kd

    kw = dict(kind=args.kind, beta=args.beta)
    rows: list[H.Row] = []
    for n in tokens:
        for v in vocabs:
            g = torch.Generator(device=dev).manual_seed(0)
            s = (torch.randn(n, v, device=dev, generator=g) * 2).to(dtype).requires_grad_(True)
            with torch.no_grad():  # teacher top-k from random logits, built in chunks
                ids = torch.empty(n, args.k, dtype=torch.int32, device=dev)
                lps = torch.empty(n, args.k, dtype=dtype, device=dev)
                tail = torch.empty(n, dtype=torch.float32, device=dev)
                for c0 in range(0, n, 1024):
                    t = torch.randn(min(1024, n - c0), v, device=dev, generator=g) * 2
                    logz = torch.logsumexp(t, -1, keepdim=True)
                    vals, idx = torch.topk(t, args.k, dim=-1)
                    ids[c0:c0 + len(t)] = idx.to(torch.int32)
                    lps[c0:c0 + len(t)] = (vals - logz).to(dtype)
                    tail[c0:c0 + len(t)] = (1 - (vals - logz).exp().sum(-1)).clamp(0, 1)
                    del t
            labels = torch.randint(0, v, (n,), device=dev, generator=g)
            labels[torch.rand(n, device=dev, generator=g) < 0.05] = -100
            e = s.element_size()
            providers = {
                "ref": lambda: topk_kd_ref(s, ids, lps, tail, labels, **kw),
                "triton": lambda: topk_kd(s, ids, lps, tail, labels, **kw),
            }
            if args.kind == "forward_kl":
                providers["torch"] = lambda: eager_topk_forward_kl(s, ids, lps, tail, labels, 1.0)
            for name in args.providers:
                if name not in providers:
                    continue
                if name == "triton" and env.interp and n * v > args.interp_max_elems:
                    continue
                for mode in args.modes:
                    if name == "triton" and env.interp and mode == "fwd":
                        continue
                    fn = providers[name]

                    def call(fn=fn, mode=mode):
                        out = fn()
                        if mode == "fwd+bwd":
                            out.backward()
                            s.grad = None
                        del out

                    bytes_moved = n * v * e + (n * v * e if mode == "fwd+bwd" else 0)
                    H.run_case(rows, env, op="topk_kd", provider=name, mode=mode, tokens=n,
                               vocab=v, extra=f"{args.kind} k={args.k}", fn=call,
                               bytes_moved=bytes_moved, reps=reps)
            del s, ids, lps, tail, labels, providers
            if dev == "cuda":
                torch.cuda.empty_cache()
    H.add_speedups(rows, env)
    H.print_table(rows, env, f"topk_kd kind={args.kind} k={args.k} {args.dtype}")
    H.print_json(rows, env, "topk_kd")


if __name__ == "__main__":
    main()
