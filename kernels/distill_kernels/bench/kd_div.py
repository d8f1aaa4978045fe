"""Benchmark kd_div: ``python -m distill_kernels.bench.kd_div [--kind jsd] [--device cpu --small]``.

Providers: torch (eager: log_softmax both sides in fp32, then the divergence as TRL writes it),
ref (kernels/distill_kernels/ref.py kd_div_ref), triton (distill_kernels.kd_div), liger (log_softmax both sides,
then LigerJSD; JSD kinds only, when liger-kernel is installed). "fwd" is the training forward
(inputs require grad: the fused kernels form the gradient there), "fwd+bwd" adds backward.
Minimal traffic used for GB/s: read student + teacher once (fwd); + write the gradient (fwd+bwd).
"""

from __future__ import annotations

import math

from distill_kernels.bench import harness as H  # sets TRITON_INTERPRET on CPU first

import torch  # noqa: E402


def eager_divergence(s, t, labels, kind, beta, temperature):
    """What a user writes in plain torch (fp32 log-softmaxes, then the divergence)."""
    log_q = torch.log_softmax(s.float() / temperature, dim=-1)
    log_p = torch.log_softmax(t.float() / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        per = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
        per = (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
               + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    else:
        raise ValueError(f"eager baseline has no {kind!r}")
    mask = labels != -100
    return (per * mask).sum() / mask.sum().clamp_min(1)


def main(argv=None):
    p = H.base_parser(__doc__.splitlines()[0])
    p.add_argument("--kind", default="jsd",
                   choices=["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    env = H.make_env(args.device)
    small = args.small or env.device == "cpu"
    tokens = args.tokens or ([256, 1024] if small else [1024, 4096, 16384])
    vocabs = args.vocab or ([32000, 128256] if small else [32000, 128256, 152064])
    reps = args.reps or (3 if env.device == "cpu" else 20)
    dtype = H.DTYPES[args.dtype]
    dev = env.device

    from distill_kernels.kd_div import kd_div
    from distill_kernels.ref import kd_div_ref

    liger_cls = H.try_import_liger("LigerJSD") if args.kind == "jsd" else None
    kw = dict(kind=args.kind, beta=args.beta, temperature=args.temperature)
    rows: list[H.Row] = []
    for n in tokens:
        for v in vocabs:
            g = torch.Generator(device=dev).manual_seed(0)
            s = (torch.randn(n, v, device=dev, generator=g) * 2).to(dtype).requires_grad_(True)
            t = (torch.randn(n, v, device=dev, generator=g) * 2).to(dtype)
            labels = torch.randint(0, v, (n,), device=dev, generator=g)
            labels[torch.rand(n, device=dev, generator=g) < 0.05] = -100
            e = s.element_size()
            providers = {
                "torch": lambda: eager_divergence(s, t, labels, args.kind, args.beta, args.temperature),
                "ref": lambda: kd_div_ref(s, t, labels, **kw),
                "triton": lambda: kd_div(s, t, labels, **kw),
            }
            if liger_cls is not None:
                liger = liger_cls(beta=args.beta)

                def run_liger():
                    log_q = torch.log_softmax(s.float() / args.temperature, -1)
                    log_p = torch.log_softmax(t.float() / args.temperature, -1)
                    return liger(log_q, log_p, labels)

                providers["liger"] = run_liger
            for name in args.providers:
                if name not in providers:
                    continue
                note = ""
                if name == "triton" and env.interp and n * v > args.interp_max_elems:
                    continue
                if name == "liger":
                    note = "incl. the 2 log_softmax its API needs"
                for mode in args.modes:
                    if name == "triton" and env.interp and mode == "fwd":
                        continue  # interpreter: only the memory of fwd+bwd is informative
                    fn = providers[name]

                    def call(fn=fn, mode=mode):
                        out = fn()
                        if mode == "fwd+bwd":
                            out.backward()
                            s.grad = None
                        del out

                    bytes_moved = 2 * n * v * e + (n * v * e if mode == "fwd+bwd" else 0)
                    H.run_case(rows, env, op="kd_div", provider=name, mode=mode, tokens=n, vocab=v,
                               extra=f"{args.kind}", fn=call, bytes_moved=bytes_moved, reps=reps,
                               note=note)
            del s, t, labels, providers
            if dev == "cuda":
                torch.cuda.empty_cache()
    H.add_speedups(rows, env)
    H.print_table(rows, env, f"kd_div kind={args.kind} beta={args.beta} T={args.temperature} {args.dtype}")
    H.print_json(rows, env, "kd_div")


if __name__ == "__main__":
    main()
