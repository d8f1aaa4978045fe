"""The chunked torch divergences against kernels/distill_kernels/ref.py over the STYLE.md case matrix."""

from __future__ import annotations

import pytest
import torch

from distill.losses import divergence, forward_kl, jsd, reverse_kl, skew_kl, skew_reverse_kl, tvd
from distill.losses import divergences as D
from distill.losses.teacher_output import TopKTeacher
from distill_kernels import ref as ref_mod
from distill_kernels.ref import assert_close_to_ref, kd_div_ref, topk_kd_ref

# (kind, beta, alpha): every kind, JSD at both ends and in the middle.
VARIANTS = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.3),
    ("tvd", 0.5, 0.1),
]
VID = [f"{k}-b{b}-a{a}" for k, b, a in VARIANTS]


def _inputs(shape, vocab, seed=0, scale=3.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=g) * scale
    t = torch.randn(*shape, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return s, t, labels


def _run(fn, s, *args, upstream, **kw):
    """(output, grad of the student logits) for fn(s, *args) with a given upstream gradient."""
    x = s.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    w = upstream if out.dim() == 0 else upstream.reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad


def _check(ours_fn, ref_fn, s32, dtype, teacher32, teacher_d, upstream, name, **kw):
    """ours on dtype inputs vs the reference on fp32 inputs (ref_fp32) and on dtype inputs."""
    out, g = _run(ours_fn, s32.to(dtype), teacher_d, upstream=upstream, **kw)
    r32, g32 = _run(ref_fn, s32, teacher32, upstream=upstream, **kw)
    rd, gd = _run(ref_fn, s32.to(dtype), teacher_d, upstream=upstream, **kw)
    assert g.dtype == dtype
    assert_close_to_ref(out.reshape(r32.shape), rd.reshape(r32.shape), r32, name=f"{name} loss")
    assert_close_to_ref(g, gd, g32, atol=_grad_atol(g32, dtype), name=f"{name} grad")


def _grad_atol(g32, dtype):
    """Floor for gradients, relative to the largest element (the helper's default floor is
    1e-5 absolute, which would swamp gradients of size 1/(rows*vocab)): 1e-5 in fp32; in bf16/fp16
    one ulp, because the gradient is stored in the logits dtype and scaled by the upstream
    gradient in backward: two roundings."""
    scale = float(g32.abs().max())
    return (1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps) * scale


def _ours_full(kind, labels=None, **kw):
    return lambda s, t, **k: divergence(kind, s, t, labels, impl="torch", **kw, **k)


def _ref_full(kind, labels=None, **kw):
    return lambda s, t, **k: kd_div_ref(s, t, labels, kind=kind, **kw, **k)


def _ref_topk(kind, labels=None, **kw):
    return lambda s, tk, **k: topk_kd_ref(s, tk.ids, tk.logprobs, tk.tail_mass, labels, kind=kind,
                                          **kw, **k)


# (dtype, temperature): each dtype once, temperature != 1 in each.
DT = [(torch.float32, 2.0), (torch.bfloat16, 0.8)]
DTID = ["fp32-T2", "bf16-T0.8"]


@pytest.mark.parametrize("dtype,temperature", DT, ids=DTID)
@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_full_teacher_odd_shape(kind, beta, alpha, temperature, dtype):
    # 3 x 47 x 1271, ragged chunks of 16 rows, ignored rows, upstream gradient != 1.
    s, t, labels = _inputs((3, 47), 1271)
    kw = dict(beta=beta, alpha=alpha, temperature=temperature)
    cases = [("mean", torch.tensor(0.37))]
    if dtype == torch.float32:
        cases.append(("none", torch.randn(3 * 47, generator=torch.Generator().manual_seed(0))))
    for reduction, up in cases:
        _check(
            lambda x, tt, **k: divergence(kind, x, tt, labels, impl="torch", chunk_tokens=16,
                                          reduction=reduction, **k),
            lambda x, tt, **k: kd_div_ref(x, tt, labels, kind=kind, reduction=reduction, **k),
            s, dtype, t, t.to(dtype), up, f"{kind} T={temperature} {reduction}", **kw,
        )


@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_full_teacher_power_of_two_and_sum(kind, beta, alpha):
    # 2 x 64 x 4096, default chunking (one chunk) and 8-row chunks give the same, reduction="sum".
    s, t, labels = _inputs((2, 64), 4096, seed=1)
    kw = dict(beta=beta, alpha=alpha, temperature=1.5, reduction="sum")
    up = torch.tensor(-2.5)
    _check(_ours_full(kind, labels=labels, chunk_tokens=8), _ref_full(kind, labels=labels),
           s, torch.float32, t, t, up, kind, **kw)
    _check(_ours_full(kind, labels=labels), _ref_full(kind, labels=labels),
           s, torch.float32, t, t, up, kind, **kw)


def _ref_fp64(kind, labels, beta, alpha, temperature):
    """kernels/distill_kernels/ref.py's definition evaluated in fp64 (its log-prob -> divergence code, fed fp64
    log-probs). At V = 151,936 the fp32 reference itself is off by ~1e-4 relative (torch's CPU
    fp32 log_softmax accumulates 152k terms), more than our chunked path (which agrees with fp64
    to ~1e-6), so here fp64 plays the role of ``ref_fp32`` and the fp32 reference's own error
    sets the bar, exactly the flash-attention rule one precision up."""

    def fn(s, t):
        log_q = torch.log_softmax(s.double() / temperature, -1)
        log_p = torch.log_softmax(t.double() / temperature, -1)
        rows = ref_mod._divergence_from_logprobs(log_q, log_p, kind, beta, alpha)
        return ref_mod._reduce(rows, labels, -100, "mean")

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_full_teacher_vocab_151936(kind, beta, alpha, dtype):
    # Qwen2.5's vocabulary, few rows; chunks of 2 rows; temperature != 1.
    s, t, labels = _inputs((5,), 151_936, seed=2, ignore_frac=0.0)
    labels[3] = -100
    kw = dict(beta=beta, alpha=alpha, temperature=0.7)
    up = torch.tensor(1.3)
    out, g = _run(_ours_full(kind, labels=labels, chunk_tokens=2), s.to(dtype), t.to(dtype),
                  upstream=up, **kw)
    r64, g64 = _run(_ref_fp64(kind, labels, beta, alpha, 0.7), s, t, upstream=up)
    if dtype == torch.float32:  # the bar: the fp32 reference's own error
        rd, gd = _run(_ref_full(kind, labels=labels), s, t, upstream=up, **kw)
    else:  # the bar: the effect of rounding the inputs to the dtype
        rd, gd = _run(_ref_fp64(kind, labels, beta, alpha, 0.7), s.to(dtype), t.to(dtype),
                      upstream=up)
        gd = gd.to(dtype)
    assert_close_to_ref(out, rd, r64, name=f"{kind} loss")
    assert_close_to_ref(g, gd, g64, atol=_grad_atol(g64, dtype), name=f"{kind} grad")


@pytest.mark.parametrize("dtype,temperature", DT, ids=DTID)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_topk_teacher(kind, beta, alpha, k, temperature, dtype):
    s, t, labels = _inputs((3, 17), 1271, seed=3)
    tk32 = TopKTeacher.from_logits(t, k, temperature=temperature)
    tkd = TopKTeacher.from_logits(t, k, temperature=temperature, values_dtype=dtype)  # bf16 log-probs, fp32 tail
    kw = dict(beta=beta, alpha=alpha, temperature=temperature)
    _check(_ours_full(kind, labels=labels, chunk_tokens=20), _ref_topk(kind, labels=labels),
           s, dtype, tk32, tkd, torch.tensor(0.61), f"top{k} {kind}", **kw)


@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_topk_without_tail_mass(kind, beta, alpha):
    # tail_mass=None: derived as clamp(1 - sum exp(logprobs)), as the reference does.
    s, t, labels = _inputs((2, 33), 500, seed=4)
    full = TopKTeacher.from_logits(t, 8, temperature=1.3)
    tk = TopKTeacher(ids=full.ids, logprobs=full.logprobs, tail_mass=None, temperature=1.3)
    kw = dict(beta=beta, alpha=alpha, temperature=1.3)
    _check(_ours_full(kind, labels=labels, chunk_tokens=7), _ref_topk(kind, labels=labels),
           s, torch.float32, tk, tk, torch.tensor(1.0), kind, **kw)


@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_topk_with_k_equal_vocab_is_the_full_form(kind, beta, alpha):
    s, t, labels = _inputs((2, 19), 257, seed=5)
    tk = TopKTeacher.from_logits(t, 257, temperature=1.7)
    kw = dict(beta=beta, alpha=alpha, temperature=1.7)
    up = torch.tensor(0.8)
    out_k, g_k = _run(_ours_full(kind, labels=labels, chunk_tokens=5), s, tk, upstream=up, **kw)
    out_f, g_f = _run(_ours_full(kind, labels=labels, chunk_tokens=5), s, t, upstream=up, **kw)
    ref, g_ref = _run(_ref_full(kind, labels=labels), s, t, upstream=up, **kw)
    assert_close_to_ref(out_k, ref, ref, name="loss k=V vs full ref")
    assert_close_to_ref(g_k, g_ref, g_ref, name="grad k=V vs full ref")
    torch.testing.assert_close(out_k, out_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_k, g_f, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_forward_kl_gradient_is_exactly_q_minus_p_tilde(temperature):
    """Forward KL over the k + 1 buckets: d/ds = (q - p~) / T, p~ = the teacher on its k ids and its
    tail mass spread over the other tokens in proportion to q (written here from the definition)."""
    s, t, _ = _inputs((40,), 300, seed=6)
    k = 16
    tk = TopKTeacher.from_logits(t, k, temperature=temperature)
    x = s.clone().requires_grad_()
    forward_kl(x, tk, temperature=temperature, impl="torch", chunk_tokens=7).backward()
    p_full = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    top = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, tk.ids.long(), True)
    p_tail = p_full.masked_fill(top, 0).sum(-1, keepdim=True)
    q_tail = q.masked_fill(top, 0).sum(-1, keepdim=True)
    p_tilde = torch.where(top, p_full, q * p_tail / q_tail)
    expected = (q - p_tilde) / temperature / s.shape[0]
    torch.testing.assert_close(x.grad.double(), expected, rtol=0, atol=2e-8)
    # Without the tail term the gradient would be (M q - p) / T / n: measurably different here.
    p_top = torch.where(top, p_full, 0)
    no_tail = (p_top.sum(-1, keepdim=True) * q - p_top) / temperature / s.shape[0]
    assert float((x.grad.double() - no_tail).abs().max()) > 1e-5


@pytest.mark.parametrize("form", ["full", "topk"])
@pytest.mark.parametrize("kind,beta,alpha", VARIANTS, ids=VID)
def test_all_ignored_rows_give_zero_loss_and_zero_grad(kind, beta, alpha, form):
    s, t, _ = _inputs((2, 9), 300, seed=7)
    labels = torch.full((2, 9), -100)
    teacher = t if form == "full" else TopKTeacher.from_logits(t, 8)
    for reduction in ("mean", "sum", "none"):
        x = s.clone().requires_grad_()
        out = divergence(kind, x, teacher, labels, beta=beta, alpha=alpha, reduction=reduction,
                         impl="torch", chunk_tokens=4)
        out.sum().backward()
        assert torch.count_nonzero(out) == 0
        assert torch.count_nonzero(x.grad) == 0


def test_ignored_rows_with_garbage_logits_stay_zero():
    # NaN/inf in ignored (padding) rows must not leak into the loss or the gradient.
    s, t, labels = _inputs((2, 9), 300, seed=8)
    labels[1] = -100
    s[1] = float("nan")
    t[1, :, :5] = -float("inf")
    for kind, beta, alpha in VARIANTS:
        x = s.clone().requires_grad_()
        out = divergence(kind, x, t, labels, beta=beta, alpha=alpha, impl="torch", chunk_tokens=4)
        out.backward()
        assert torch.isfinite(out)
        assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[1]) == 0


def test_functionals_are_divergence_by_name():
    s, t, labels = _inputs((2, 7), 100, seed=9)
    for fn, kind in ((forward_kl, "forward_kl"), (reverse_kl, "reverse_kl"), (jsd, "jsd"),
                     (skew_kl, "skew_kl"), (skew_reverse_kl, "skew_reverse_kl"), (tvd, "tvd")):
        ref = kd_div_ref(s, t, labels, kind=kind, beta=0.3, alpha=0.2, temperature=1.2)
        out = fn(s, t, labels, beta=0.3, alpha=0.2, temperature=1.2, impl="torch")
        assert_close_to_ref(out, ref, ref, name=kind)
        assert fn.__name__ == kind


def test_fp16_inputs():
    s, t, labels = _inputs((3, 11), 640, seed=10)
    _check(_ours_full("jsd", labels=labels, chunk_tokens=8), _ref_full("jsd", labels=labels),
           s, torch.float16, t, t.half(), torch.tensor(0.5), "jsd fp16", beta=0.5, temperature=2.0)


def test_non_contiguous_vocab_slice_and_mixed_dtypes():
    # Student [B, L, 1100] bf16 sliced to 1000 columns, teacher fp32 [B, L, 1200] sliced too.
    g = torch.Generator().manual_seed(11)
    s_full = (torch.randn(2, 13, 1100, generator=g) * 2).bfloat16().requires_grad_()
    t_full = torch.randn(2, 13, 1200, generator=g) * 2
    s_view, t_view = s_full[..., :1000], t_full[..., :1000]
    assert not s_view.is_contiguous()
    out = reverse_kl(s_view, t_view, temperature=1.5, impl="torch", chunk_tokens=6)
    out.backward()
    ref = kd_div_ref(s_view.detach().contiguous(), t_view.contiguous(), kind="reverse_kl",
                     temperature=1.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(s_full.grad[..., 1000:]) == 0
    # vocab_size= on the full tensors: same loss, the gradient lands in the full buffer directly.
    x = s_full.detach().clone().requires_grad_()
    out2 = reverse_kl(x, t_full, temperature=1.5, impl="torch", chunk_tokens=6, vocab_size=1000)
    out2.backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(x.grad, s_full.grad)


def test_grad_inplace_writes_into_logits_and_matches():
    s, t, labels = _inputs((3, 10), 333, seed=12)
    base = divergence("jsd", s.clone().requires_grad_(), t, labels, impl="torch")
    x0 = s.clone().requires_grad_()
    divergence("jsd", x0, t, labels, impl="torch", chunk_tokens=4).backward()
    w = s.clone().requires_grad_()
    logits = w * 1.0  # a non-leaf, like an lm_head output
    out = divergence("jsd", logits, t, labels, impl="torch", chunk_tokens=4, grad_inplace=True)
    torch.testing.assert_close(out, base)
    assert not torch.equal(logits.detach(), s)  # the buffer now holds the gradient
    out.backward()
    torch.testing.assert_close(w.grad, x0.grad)


def test_grad_inplace_refuses_silent_corruption():
    # An op that saved the logits for its backward (tanh saves its output) fails loudly.
    s, t, labels = _inputs((2, 5), 64, seed=13)
    w = s.clone().requires_grad_()
    logits = torch.tanh(w)
    out = divergence("forward_kl", logits, t, labels, impl="torch", grad_inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_student_softcap_matches_autograd_through_the_cap():
    s, t, labels = _inputs((2, 21), 700, seed=14, scale=20.0)
    cap_s, cap_t = 30.0, 25.0
    for teacher_form in ("full", "topk"):
        if teacher_form == "full":
            teacher, t_cap, kw = t, cap_t * torch.tanh(t / cap_t), dict(teacher_softcap=cap_t)
            ref_fn = lambda x: kd_div_ref(cap_s * torch.tanh(x / cap_s), t_cap, labels,  # noqa: E731
                                          kind="jsd", beta=0.4, temperature=2.0)
        else:
            teacher = TopKTeacher.from_logits(cap_t * torch.tanh(t / cap_t), 8, temperature=2.0)
            kw = {}
            ref_fn = lambda x: topk_kd_ref(cap_s * torch.tanh(x / cap_s), teacher.ids,  # noqa: E731
                                           teacher.logprobs, teacher.tail_mass, labels,
                                           kind="jsd", beta=0.4, temperature=2.0)
        x = s.clone().requires_grad_()
        out = jsd(x, teacher, labels, beta=0.4, temperature=2.0, impl="torch", chunk_tokens=8,
                  student_softcap=cap_s, **kw)
        out.backward()
        xr = s.clone().requires_grad_()
        ref = ref_fn(xr)
        ref.backward()
        assert_close_to_ref(out.detach(), ref.detach(), ref.detach(), name=f"softcap {teacher_form}")
        assert_close_to_ref(x.grad, xr.grad, xr.grad, name=f"softcap {teacher_form} grad")
        assert abs(float(out.detach()) - float(jsd(s, teacher, labels, beta=0.4, temperature=2.0))) > 1e-4


def test_teacher_requiring_grad_is_refused():
    s, t, _ = _inputs((2, 3), 50)
    with pytest.raises(ValueError, match="frozen"):
        forward_kl(s, t.requires_grad_(), impl="torch")
    tk = TopKTeacher.from_logits(t.detach(), 4)
    tk.logprobs.requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        forward_kl(s, tk, impl="torch")


def test_bad_arguments_are_clear_errors():
    s, t, _ = _inputs((2, 3), 50)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        divergence("kl", s, t)
    with pytest.raises(ValueError, match="60 logit columns and student 50"):
        forward_kl(s, torch.randn(2, 3, 60))
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, t, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        forward_kl(s, t, impl="cuda")
    with pytest.raises(ValueError, match="teacher_softcap"):
        forward_kl(s, TopKTeacher.from_logits(t, 4), teacher_softcap=30.0)


def test_impl_auto_is_torch_on_cpu_and_explicit_triton_never_falls_back(monkeypatch):
    """Explicit impl="triton" without its kernels: one line, no torch result (the auto fallback and its
    one warning: tests/losses/test_impl_choice.py)."""
    s, t, labels = _inputs((2, 5), 64, seed=15)
    assert D.resolve_impl("auto", s) == "torch"
    real_import = D.importlib.import_module

    def broken(name, *a, **k):
        if name.startswith("distill_kernels."):
            raise ImportError("no kernels here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(D.importlib, "import_module", broken)
    monkeypatch.setattr(D, "_warned", set())
    with pytest.raises(D.KernelUnavailable, match=r"impl='triton': distill_kernels.kd_div cannot run .*no kernels here"):
        tvd(s, t, labels, impl="triton")
    ref = kd_div_ref(s, t, labels, kind="tvd")
    assert_close_to_ref(tvd(s, t, labels, impl="auto"), ref, ref)  # CPU logits: torch, no kernel asked for


@pytest.mark.triton_interp
@pytest.mark.parametrize("form", ["full", "topk"])
def test_impl_triton_matches_torch(form, monkeypatch):
    pytest.importorskip("triton")
    s, t, labels = _inputs((2, 6), 300, seed=16)
    import importlib

    teacher = t if form == "full" else TopKTeacher.from_logits(t, 8, temperature=2.0)
    up = torch.tensor(0.7)
    name = "kd_div" if form == "full" else "topk_kd"
    mod = importlib.import_module(f"distill_kernels.{name}")
    real, calls = getattr(mod, name), []
    monkeypatch.setattr(mod, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    out_tr, g_tr = _run(lambda x, tt, **k: jsd(x, tt, labels, impl="triton", **k), s, teacher,
                        upstream=up, beta=0.5, temperature=2.0)
    assert calls, f"distill_kernels.{name} did not run"  # else this compares torch with torch
    out_t, g_t = _run(lambda x, tt, **k: jsd(x, tt, labels, impl="torch", **k), s, teacher,
                      upstream=up, beta=0.5, temperature=2.0)
    assert_close_to_ref(out_tr, out_t, out_t, name="triton vs torch loss")
    assert_close_to_ref(g_tr, g_t, g_t, name="triton vs torch grad")


# -- the top-k convention: a student equal to its teacher has zero divergence ------------------------

ZERO_KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9),
              ("jsd", 1.0), ("skew_kl", 0.5), ("skew_reverse_kl", 0.5), ("tvd", 0.5)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_topk_zero_divergence_at_equality(temperature):
    """Every kind x k in {1, 16, V}: the reference and the torch path give 0 loss (and, but for TVD,
    a 0 gradient: the teacher is the optimum) when the student's logits are the teacher's and the
    teacher's top-k is taken at the temperature of use."""
    vocab = 97
    s, _, labels = _inputs((3, 11), vocab, seed=21, scale=4.0)
    for k in (1, 16, vocab):
        tk = TopKTeacher.from_logits(s, k, temperature=temperature)
        for kind, beta in ZERO_KINDS:
            kw = dict(beta=beta, alpha=0.2, temperature=temperature, reduction="sum")
            ref = topk_kd_ref(s, tk.ids, tk.logprobs, tk.tail_mass, labels, kind=kind, **kw)
            assert abs(float(ref)) < 1e-5, (kind, beta, k, float(ref))
            x = s.clone().requires_grad_()
            out = divergence(kind, x, tk, labels, impl="torch", chunk_tokens=8, **kw)
            out.backward()
            assert abs(float(out.detach())) < 1e-5, (kind, beta, k, float(out.detach()))
            if kind != "tvd":  # |p - q| has no gradient at p = q; its subgradient sign(q - p) is fp32 noise
                assert float(x.grad.abs().max()) < 1e-5, (kind, beta, k, float(x.grad.abs().max()))


def test_topk_zero_at_equality_fails_under_the_old_convention():
    """The T = 1 top-k tempered as a whole (the earlier convention) is not zero at T = 2: the test above
    would catch a return to it."""
    s, _, _ = _inputs((4, 5), 97, seed=22, scale=4.0)
    t1 = TopKTeacher.from_logits(s, 16)
    lp = torch.log_softmax(torch.cat([t1.logprobs, t1.tail_mass.log()[..., None]], -1) / 2.0, -1)
    old = TopKTeacher(ids=t1.ids, logprobs=lp[..., :-1], tail_mass=lp[..., -1].exp(), temperature=2.0)
    assert float(reverse_kl(s, old, temperature=2.0, impl="torch")) > 1e-2


def test_topk_teacher_at_another_temperature_is_refused():
    s, t, _ = _inputs((2, 5), 97, seed=23)
    tk = TopKTeacher.from_logits(t, 8, temperature=1.0)
    with pytest.raises(ValueError, match="computed at temperature 1, but the loss uses temperature 2"):
        forward_kl(s, tk, temperature=2.0, impl="torch")


def test_topk_over_the_real_vocabulary_only():
    """Padded columns (past vocab_size) never enter the teacher's top-k, log-partition or tail, and the
    loss at equality over the real vocabulary is 0 whatever the padded columns hold."""
    real = 90
    s, _, _ = _inputs((2, 7), real, seed=24, scale=3.0)
    padded = torch.cat([s, torch.full((2, 7, 30), 50.0)], -1)  # padding that would dominate the top-k
    tk = TopKTeacher.from_logits(padded, 8, temperature=2.0, vocab_size=real)
    assert int(tk.ids.max()) < real
    ref_ids, ref_lp, ref_tail = ref_mod.topk_of_logits_ref(s, 8, temperature=2.0)
    torch.testing.assert_close(tk.logprobs, ref_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(tk.tail_mass, ref_tail, rtol=1e-5, atol=1e-7)
    student = torch.cat([s, torch.randn(2, 7, 10) * 30], -1)  # the student's own padding differs
    out = reverse_kl(student, tk, temperature=2.0, vocab_size=real, impl="torch")
    assert abs(float(out)) < 1e-6
