"""The loss registry picks the kernels (impl="triton") and they agree with the torch path; a few
optimizer steps of a tiny model give the same loss curve with impl="torch" and impl="triton"."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

losses = pytest.importorskip("distill.losses")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count calls that reach the kernels' functionals (the dispatcher looks them up by name)."""
    import importlib

    # The submodules, not the package attributes (distill_kernels.kd_div is the function).
    kd_mod = importlib.import_module("distill_kernels.kd_div")
    topk_mod = importlib.import_module("distill_kernels.topk_kd")

    calls = {"kd_div": 0, "topk_kd": 0}

    def spy(mod, name):
        real = getattr(mod, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, name, wrapped)

    spy(kd_mod, "kd_div")
    spy(topk_mod, "topk_kd")
    return calls


FNS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("teacher_kind", ["logits", "topk"])
@pytest.mark.parametrize("fn", FNS)
def test_losses_impl_triton_equals_torch(kernel_calls, fn, teacher_kind):
    from distill.losses.teacher_output import TopKTeacher

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 211, generator=g) * 2
    t = torch.randn(2, 5, 211, generator=g) * 2
    labels = torch.randint(0, 211, (2, 5), generator=g)
    labels[0, :2] = -100
    teacher = t if teacher_kind == "logits" else TopKTeacher.from_logits(t, 16, temperature=1.5)
    outs, grads = [], []
    for impl in ("torch", "triton"):
        x = s.clone().requires_grad_(True)
        out = getattr(losses, fn)(x, teacher, labels, temperature=1.5, impl=impl)
        (out * 0.7).backward()
        outs.append(out.detach())
        grads.append(x.grad)
    name = "kd_div" if teacher_kind == "logits" else "topk_kd"
    assert kernel_calls[name] == 1, f"impl='triton' did not reach distill_kernels.{name}"
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("teacher_kind,kind", [("logits", "jsd"), ("topk", "forward_kl")])
def test_tiny_model_loss_curve_torch_vs_triton(kernel_calls, teacher_kind, kind):
    """Student + teacher from distill.models.tiny ("micro"), SGD, 4 steps through
    DistillObjective (the trainer's objective): the two impls give the same losses and weights."""
    pytest.importorskip("transformers")
    from distill.losses.objective import DistillObjective, count_targets
    from distill.models.tiny import build_tiny_causal_lm
    from distill.losses.teacher_output import TopKTeacher

    vocab = 320
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100
    attention_mask = torch.ones_like(input_ids)
    teacher = build_tiny_causal_lm(vocab, "micro", seed=1).eval()
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    t_in = t_logits if teacher_kind == "logits" else TopKTeacher.from_logits(t_logits, 8, temperature=2.0)

    curves, finals = {}, {}
    for impl in ("torch", "triton"):
        student = build_tiny_causal_lm(vocab, "micro", seed=0)
        # SGD, not AdamW: the weights are then linear in the gradients, so they compare what the two
        # impls compute. AdamW divides each coordinate by its own |g| + eps and would amplify fp32
        # rounding on tiny gradients into weight differences.
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        obj = DistillObjective(kind=kind, beta=0.5, temperature=2.0, impl=impl)
        curve = []
        for _ in range(4):
            logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
            out = obj(logits, t_in, labels, count_targets(labels))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            curve.append(float(out.loss.detach()))
        curves[impl] = curve
        finals[impl] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert kernel_calls["kd_div" if teacher_kind == "logits" else "topk_kd"] == 4
    assert curves["torch"][-1] < curves["torch"][0]  # it trains
    torch.testing.assert_close(curves["triton"], curves["torch"], rtol=1e-5, atol=1e-6)
    # Compare what the two impls moved the weights by (SGD: linear in the summed gradients). fp32
    # rounding fed back through 4 steps leaves 2.6e-6 on one weight whose update is 0.023 (1.1e-4 of
    # it; torch 2.13, transformers 5.25), far inside rtol=1e-3; a wrong gradient is off by O(1).
    init = torch.cat([p.detach().flatten() for p in build_tiny_causal_lm(vocab, "micro", seed=0).parameters()])
    torch.testing.assert_close(finals["triton"] - init, finals["torch"] - init, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_objective_triton_topk_with_padded_vocabularies(kernel_calls, temperature):
    """The trainer's objective on the Triton path: a student (8 padded columns) and a teacher top-k
    from logits with 40 padded columns that would win it, both sliced to the tokenizer's 300 tokens.
    The kernel is used, its KD equals the torch path's, and a student equal to the teacher on the
    real vocabulary has KD 0 and a zero gradient there (padded columns: zero gradient)."""
    from distill.losses.objective import DistillObjective, count_targets
    from distill.losses.teacher_output import TopKTeacher

    vocab = 300
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 7, vocab + 40, generator=g) * 3
    t[..., vocab:] = 40.0
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[:, :2] = -100
    tk = TopKTeacher.from_logits(t, 8, temperature=temperature, vocab_size=vocab)
    assert int(tk.ids.max()) < vocab
    n = count_targets(labels)
    kw = dict(kind="reverse_kl", temperature=temperature, ce_weight=0.0, vocab_size=vocab)
    equal = torch.cat([t[..., :vocab], torch.randn(2, 7, 8, generator=g) * 30], -1)
    other = torch.randn(2, 7, vocab + 8, generator=g) * 3
    for s in (equal, other):
        outs, grads = {}, {}
        for impl in ("torch", "triton"):
            x = s.clone().requires_grad_(True)
            out = DistillObjective(impl=impl, **kw)(x, tk, labels, n)
            out.loss.backward()
            outs[impl], grads[impl] = out.kd_sum, x.grad
        assert torch.count_nonzero(grads["triton"][..., vocab:]) == 0
        if s is equal:  # both ~0: fp32 rounding of a sum over 10 rows (torch -1.3e-6, kernel -5.7e-8 at T=1)
            for impl in ("torch", "triton"):
                assert abs(float(outs[impl])) < 1e-5, impl
                assert float(grads[impl].abs().max()) < 1e-6, impl
        else:
            torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-7)
    assert kernel_calls["topk_kd"] == 2
