"""Label-level targets across two tokenizers; token-level KD with different vocabularies is refused."""

from __future__ import annotations

import math

import pytest
import torch

from distill.icldist.targets import (
    VocabularyMismatch,
    check_token_level,
    label_kl,
    label_logprobs_from_topk,
    label_token_ids,
    pad_label_ids,
)
from distill.losses.teacher_output import TopKTeacher

TASKS = {"sc/twitter": ["negative", "positive", "neutral"], "multifaced/tweeteval": ["anger", "joy", "sadness", "optimism"],
         "multifaced/intimacy": ["not intimate", "moderately intimate", "highly intimate"]}


def test_each_side_uses_its_own_verbalizer(tiny_tokenizer, other_tokenizer):
    for task, words in TASKS.items():
        t_ids = label_token_ids(tiny_tokenizer, task, words)
        s_ids = label_token_ids(other_tokenizer, task, words)
        assert len(set(t_ids)) == len(words) and len(set(s_ids)) == len(words)
        for w, ti, si in zip(words, t_ids, s_ids):
            assert tiny_tokenizer.decode([ti]).strip() and w.startswith(tiny_tokenizer.decode([ti]).strip())
            assert w.startswith(other_tokenizer.decode([si]).strip())
    # the two vocabularies really differ (the test would be vacuous otherwise)
    assert len(tiny_tokenizer) != len(other_tokenizer)


def test_label_logprobs_from_full_topk_are_the_renormalised_teacher():
    torch.manual_seed(0)
    V = 50
    logits = torch.randn(3, V, dtype=torch.float64)
    ids = pad_label_ids([[4, 9], [1, 2, 3], [7, 30, 31, 49]])
    lp = label_logprobs_from_topk(TopKTeacher.from_logits(logits.float(), V), ids, V)
    for r in range(3):
        sel = [i for i in ids[r].tolist() if i >= 0]
        want = torch.softmax(logits[r, sel], -1)
        assert torch.allclose(lp[r, : len(sel)].exp().double(), want, atol=1e-6)
        assert torch.isinf(lp[r, len(sel):]).all()


def test_label_outside_topk_gets_the_uniform_tail_estimate():
    V, k = 100, 4
    logits = torch.full((1, V), -5.0)
    logits[0, :k] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    topk = TopKTeacher.from_logits(logits, k)
    lp = label_logprobs_from_topk(topk, pad_label_ids([[0, 50]]), V)  # token 50 is not in the top-k
    p = torch.softmax(logits.double(), -1)[0]
    tail_each = (1 - p[:k].sum()) / (V - k)
    want = torch.tensor([p[0], tail_each])
    assert torch.allclose(lp[0].exp().double(), want / want.sum(), atol=1e-5)


def test_label_kl_matches_the_definition_and_its_gradient():
    torch.manual_seed(1)
    Vs = 40
    s_logits = torch.randn(2, Vs, dtype=torch.float64, requires_grad=True)
    s_ids = pad_label_ids([[3, 17, 5], [8, 2]])
    t_lp = torch.log_softmax(torch.tensor([[0.2, -1.0, 0.4], [1.5, -0.5, -float("inf")]]), -1)  # at T already
    T = 2.0
    got = label_kl(s_logits, s_ids, t_lp, temperature=T)
    want = 0.0
    for r, sel in enumerate([[3, 17, 5], [8, 2]]):
        q = torch.softmax(s_logits[r, sel] / T, -1)  # only the student is tempered
        p = t_lp[r, : len(sel)].double().exp()
        want = want + (p * (p.log() - q.log())).sum()
    assert torch.allclose(got.double(), want, atol=1e-6)
    got.backward()
    g = s_logits.grad
    off = torch.ones_like(g, dtype=torch.bool)
    off[0, [3, 17, 5]] = False
    off[1, [8, 2]] = False
    assert (g[off] == 0).all() and g[~off].abs().sum() > 0  # only the label words get gradient


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_label_kl_is_zero_when_the_student_equals_the_teacher(T):
    """The teacher's top-k taken at T (the convention) and a student with the teacher's logits: 0 at every T."""
    torch.manual_seed(2)
    N, V, k = 5, 300, 16
    logits = 3 * torch.randn(N, V)
    topk = TopKTeacher.from_logits(logits, k, temperature=T)
    label_ids = topk.ids[:, [0, 3, 7, 15]].long()  # label tokens inside the top-k
    label_ids[1, 3] = -1  # a task with 3 labels
    t_lp = label_logprobs_from_topk(topk, label_ids, V)
    # independent of the code under test: the teacher's softmax at T restricted to the labels
    for r in range(N):
        sel = [i for i in label_ids[r].tolist() if i >= 0]
        torch.testing.assert_close(t_lp[r, : len(sel)].exp(), torch.softmax(logits[r, sel].double() / T, -1).float(),
                                   atol=1e-6, rtol=1e-5)
    kl = label_kl(logits, label_ids, t_lp, temperature=T, reduction="none")
    assert kl.abs().max() < 1e-6
    # the teacher tempered a second time (the old convention on a T-top-k) is not the optimum at T != 1
    twice = label_kl(logits, label_ids, t_lp / T, temperature=T, reduction="none")
    assert (twice.abs().max() < 1e-6) == (T == 1.0)


def _examples(n_rows):
    from distill.icldist.data import StudentExample

    return [StudentExample(index=i, input_ids=list(range(12)), labels=[-100] * 6 + list(range(6)),
                           kd_pos=list(range(5, 5 + n)), label_ids=[3, 4], gold=0) for i, n in enumerate(n_rows)]


def test_assemble_keeps_the_teacher_temperature_and_refuses_a_mix():
    from distill.icldist.loss import ICLDistLoss, assemble

    torch.manual_seed(3)
    V, k, T = 64, 8, 2.0
    ex = _examples([3, 1])
    topks = [TopKTeacher.from_logits(torch.randn(3, V), k, temperature=T),
             TopKTeacher.from_logits(torch.randn(1, V), k, temperature=T)]
    tg = assemble(ex, ["fine-grained", "classification"], topks, 12, teacher_label_ids=[[], [3, 4]], teacher_vocab=V)
    assert tg.temperature == T and tg.topk.temperature == T and tg.to("cpu").temperature == T
    assert tg.topk.ids.shape == (2, 12, k) and tg.label_rows.tolist() == [[1, 5]]
    logits = torch.randn(2, 12, V)
    labels = torch.full((2, 12), -100)
    labels[:, 6:] = torch.arange(6)
    out = ICLDistLoss(temperature=T).compute(logits, labels, tg, 12)
    assert out.kd_sum > 0 and out.label_kd_sum > 0
    with pytest.raises(ValueError, match=r"ICLDistLoss at temperature 1\.0 got teacher targets at temperature 2\.0"):
        ICLDistLoss(temperature=1.0).compute(logits, labels, tg, 12)
    mixed = [topks[0], TopKTeacher.from_logits(torch.randn(1, V), k, temperature=1.0)]
    with pytest.raises(ValueError, match=r"mixes temperatures \[1\.0, 2\.0\]"):
        assemble(ex, ["fine-grained", "classification"], mixed, 12, teacher_label_ids=[[], [3, 4]], teacher_vocab=V)


def test_token_level_with_different_vocabularies_is_refused(tiny_tokenizer, other_tokenizer):
    check_token_level(tiny_tokenizer, tiny_tokenizer)
    with pytest.raises(VocabularyMismatch, match=r"different\s+vocabularies is not supported.*fine_grained=false"):
        check_token_level(tiny_tokenizer, other_tokenizer)


def test_label_level_batch_across_tokenizers(small_prompts, tiny_tokenizer, other_tokenizer, local_teacher):
    """A Llama-like teacher (4096 tokens) and a Qwen-like student (2048 tokens): label-level KD runs."""
    from distill.icldist.data import student_example, teacher_request
    from distill.icldist.loss import ICLDistLoss, assemble
    from distill.models.tiny import build_tiny_causal_lm

    cls = [(i, p) for i, p in enumerate(small_prompts) if p.kind == "classification"][:6]
    reqs = [teacher_request(p, tiny_tokenizer, None, 384) for _, p in cls]
    topks = local_teacher.topk([r.seq for r in reqs], [r.pos for r in reqs], 64)
    s_ex = [student_example(i, p, other_tokenizer, None, 384, label_token_ids(other_tokenizer, p.task, p.label_words))
            for i, p in cls]
    t_lab = [label_token_ids(tiny_tokenizer, p.task, p.label_words) for _, p in cls]
    from distill.icldist.data import collate

    batch = collate(s_ex, other_tokenizer.pad_token_id)
    tg = assemble(s_ex, ["classification"] * len(cls), topks, batch["input_ids"].shape[1],
                  teacher_label_ids=t_lab, teacher_vocab=len(tiny_tokenizer))
    assert tg.topk is None and tg.label_rows.shape == (len(cls), 2)
    # the label rows are the students' answer positions: the token after each is its gold label's first token
    for (b, t), ex in zip(tg.label_rows.tolist(), s_ex):
        assert batch["labels"][b, t + 1] == ex.label_ids[ex.gold]
    student = build_tiny_causal_lm(len(other_tokenizer), "micro", seed=3)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    from distill.losses.objective import count_targets

    loss = ICLDistLoss(ce_weight=0.5, label_kd_weight=1.0)
    out = loss.compute(logits, batch["labels"], tg, count_targets(batch["labels"]))
    assert math.isfinite(out.loss.item()) and out.label_kd_sum > 0 and out.kd_sum == 0
    out.loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("classification", ["label", "token"])
def test_icldist_lean_equals_full_logits(classification):
    """The ICLDist objective inside the student's head (kd.path=lean: supervised rows, the label words'
    head rows) equals it on the full logits: loss, its three parts, and the hidden / head gradients."""
    from distill.icldist.loss import ICLDistLoss, assemble
    from distill.losses.lean import supervised_rows

    torch.manual_seed(5)
    V, Vs, H, k, T = 64, 70, 12, 8, 2.0
    ex = _examples([3, 1])
    topks = [TopKTeacher.from_logits(torch.randn(3, V), k, temperature=T),
             TopKTeacher.from_logits(torch.randn(1, V), k, temperature=T)]
    tg = assemble(ex, ["fine-grained", "classification"], topks, 12, teacher_label_ids=[[], [3, 4]],
                  teacher_vocab=V, classification=classification)
    labels = torch.full((2, 12), -100)
    labels[:, 6:] = torch.arange(6)
    hidden = torch.randn(2, 12, H)
    weight = torch.randn(Vs, H) * 0.5

    def run(lean: bool):
        loss = ICLDistLoss(kind="jsd", beta=0.3, temperature=T, ce_weight=0.7, kd_weight=1.2, label_kd_weight=0.8,
                           vocab_size=V)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if lean:
            index, targets = supervised_rows(labels)
            req = loss.lean_request(index, targets, tg, 9)
            out = loss.lean_output(req(h, w, None), req)
        else:
            out = loss(h @ w.t(), tg, labels, 9)
        (out.loss * 1.3).backward()
        return out, out.parts, h.grad, w.grad

    (a, sa, ha, wa), (b, sb, hb, wb) = run(True), run(False)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for x, y in ((a.ce_sum, b.ce_sum), (a.kd_sum, b.kd_sum), (a.total, b.total), (sa["label_kd"], sb["label_kd"]),
                 (sa["token_kd"], sb["token_kd"])):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-6)
    assert float(sb["token_kd"]) > 0 and (classification == "token" or float(sb["label_kd"]) > 0)
    assert int(a.n_tokens) == int(b.n_tokens)
    torch.testing.assert_close(ha, hb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(wa[V:]) == 0
