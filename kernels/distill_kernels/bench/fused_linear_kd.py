"""Benchmark fused_linear_kd: ``python -m distill_kernels.bench.fused_linear_kd [--teacher full]``.

Providers: torch (eager: student and teacher logits from bf16 GEMMs, fp32 log-softmaxes, JSD as
TRL writes it, autograd), ref (kernels/distill_kernels/ref.py fused_linear_kd_ref: fp32 GEMMs; large),
triton (distill_kernels.fused_linear_kd: chunked lm_head + Triton divergence, no full logits),
liger (LigerFusedLinearJSD, full teacher and JSD only, when liger-kernel is installed).
Default GPU shapes: the issue's 8k tokens x hidden 4096 x vocab 128256, and 1k tokens.
GEMM-bound: the table reports TFLOP/s and MFU from the op's matmul FLOPs (fwd: student + teacher
logits; fwd+bwd: + the hidden and lm_head gradients), the same count for every provider.
"""

from __future__ import annotations

from distill_kernels.bench import harness as H  # sets TRITON_INTERPRET on CPU first

import torch  # noqa: E402

from distill_kernels.bench.kd_div import eager_divergence  # noqa: E402


class _TopK:
    def __init__(self, ids, logprobs, tail_mass):
        self.ids, self.logprobs, self.tail_mass = ids, logprobs, tail_mass


def main(argv=None):
    p = H.base_parser(__doc__.splitlines()[0])
    p.add_argument("--teacher", default="full", choices=["full", "topk"])
    p.add_argument("--kind", default="jsd", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.set_defaults(interp_max_elems=2**24)
    args = p.parse_args(argv)
    env = H.make_env(args.device)
    small = args.small or env.device == "cpu"
    tokens = args.tokens or ([128, 512] if small else [1024, 8192])
    vocabs = args.vocab or ([32000] if small else [128256])
    hidden = args.hidden or (256 if small else 4096)
    reps = args.reps or (3 if env.device == "cpu" else 10)
    dtype = H.DTYPES[args.dtype]
    dev = env.device

    from distill_kernels.fused_linear_kd import fused_linear_kd
    from distill_kernels.ref import fused_linear_kd_ref

    liger_cls = None
    if args.teacher == "full" and args.kind == "jsd":
        liger_cls = H.try_import_liger("LigerFusedLinearJSD")
    rows: list[H.Row] = []
    for n in tokens:
        for v in vocabs:
            g = torch.Generator(device=dev).manual_seed(0)
            h = (torch.randn(n, hidden, device=dev, generator=g)).to(dtype).requires_grad_(True)
            w = (torch.randn(v, hidden, device=dev, generator=g) / hidden**0.5).to(dtype)
            w.requires_grad_(True)
            th = (torch.randn(n, hidden, device=dev, generator=g)).to(dtype)
            tw = (torch.randn(v, hidden, device=dev, generator=g) / hidden**0.5).to(dtype)
            labels = torch.randint(0, v, (n,), device=dev, generator=g)
            labels[torch.rand(n, device=dev, generator=g) < 0.05] = -100
            if args.teacher == "full":
                teacher = (th, tw)
            else:
                with torch.no_grad():
                    t = (th @ tw.t()).float()
                    logz = torch.logsumexp(t, -1, keepdim=True)
                    vals, idx = torch.topk(t, args.k, -1)
                    tail = (torch.logsumexp(t.scatter(-1, idx, float("-inf")), -1) - logz[:, 0]).exp()
                    teacher = _TopK(idx.to(torch.int32), (vals - logz).to(dtype), tail)
                    del t
            kw = dict(kind=args.kind, beta=args.beta)

            def eager():
                s = h @ w.t()
                if args.teacher == "full":
                    return eager_divergence(s, th @ tw.t(), labels, args.kind, args.beta, 1.0)
                log_q = torch.log_softmax(s.float(), -1).gather(-1, teacher.ids.long())
                per = (teacher.logprobs.float().exp() * (teacher.logprobs.float() - log_q)).sum(-1)
                mask = labels != -100
                return (per * mask).sum() / mask.sum().clamp_min(1)

            providers = {
                "ref": lambda: fused_linear_kd_ref(h, w, teacher, labels, **kw),
                "triton": lambda: fused_linear_kd(h, w, teacher, labels,
                                                  chunk_tokens=args.chunk_tokens, **kw),
            }
            if args.teacher == "full" or args.kind == "forward_kl":
                providers["torch"] = eager
            if liger_cls is not None:
                liger = liger_cls(jsd_beta=args.beta)
                providers["liger"] = lambda: liger(h, w, th, tw, labels)
            flops_fwd = 2 * n * v * hidden * (2 if args.teacher == "full" else 1)
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
                            h.grad = None
                            w.grad = None
                        del out

                    flops = flops_fwd + (4 * n * v * hidden if mode == "fwd+bwd" else 0)
                    H.run_case(rows, env, op="fused_linear_kd", provider=name, mode=mode,
                               tokens=n, vocab=v, extra=f"{args.kind} {args.teacher} H={hidden}",
                               fn=call, flops=flops, reps=reps)
            del h, w, th, tw, teacher, providers
            if dev == "cuda":
                torch.cuda.empty_cache()
    H.add_speedups(rows, env)
    H.print_table(rows, env, f"fused_linear_kd kind={args.kind} teacher={args.teacher} {args.dtype}"
                  " | peak MiB is above inputs and weights")
    H.print_json(rows, env, "fused_linear_kd")


if __name__ == "__main__":
    main()
