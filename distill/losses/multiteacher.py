"""The multi-teacher objective on the supervised rows: CE + sum_t w_t(row) x KD(student || teacher_t).

    loss = (ce_weight * CE_sum + kd_weight * sum_rows sum_t w_t(row) * T_t^2 * KD_t(row)) / N

* ``KD_t``: the divergence ``kd.kind`` between the student and teacher t at teacher t's own
  temperature ``T_t`` (kernels/distill_kernels/ref.py conventions), scaled by ``T_t^2``; ``w_t(row)`` the weights
  of the strategy (:mod:`distill.multiteacher.weighting`), summing to 1 over the teachers at each row.
* ``N``: the step's response-token normaliser, as for the single-teacher objective.

One pass over the rows a chunk at a time (:class:`MultiLinearFunction` on the lean path): the
student's logits of the chunk once (``rows_c @ W.T``), the CE term and then, per teacher, its logits
(or top-k) at the same rows and ``divergences.chunk_terms`` (the per-chunk loss and its closed-form
gradient, the same building block as the single-teacher path) with that teacher's temperature;
the chunk's gradient is ``g_ce + sum_t w_t[:, None] * g_t``, projected to ``dL/drows_c = g @ W`` and
``dL/dW += g.T @ rows_c``. Extra teachers cost their forward and their head chunks; no
[tokens x V] tensor exists. The teachers' per-row confidences (their log-probability of the
reference token, or minus their entropy, at their temperature) come out of the same loop where the
strategy needs them (``confidence`` forms its weights from them chunk by chunk; ``attention`` trains
its gate on them), and at a ``meta`` step the loop also forms each teacher's inner product
``<G_val, dKD_t/dW>`` with the held-out head gradient ``G_val`` (docs/multiteacher.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from distill.losses.divergences import ChunkConfig, KindParams, chunk_terms, effective_kind
from distill.losses.lean import HiddenTeacher, accumulate_mm, forward_grads
from distill.losses.objective import LossOutput, step_divisor
from distill.losses.teacher_output import TopKTeacher

_TINY = 1e-30


@dataclass
class TeacherSet:
    """What the ``multiteacher`` backend hands the objective: per teacher its output at the rows
    (``rows``: TopKTeacher ``[N, k]``, HiddenTeacher or logits ``[N, V]``; ``__call__``: the same at
    ``[B, L, ...]``), or None for a teacher that is not run (fixed weight 0); ``route``: the teacher
    index of each row (``[N]``) or of each sequence (``[B]``, kd.path=logits), None unless routed."""

    teachers: list
    route: torch.Tensor | None = None


@dataclass
class Spec:
    """The fixed parts of the loss (one per run)."""

    kind: str
    beta: float
    alpha: float
    temperatures: list[float]
    ce_weight: float
    kd_weight: float
    vocab: int
    chunk: int
    scale: float = 1.0  # the student's logit scale
    student_softcap: float | None = None
    conf_signal: str | None = None  # None | gold_prob | neg_entropy: confidences the loop returns
    conf_temperature: float = 1.0  # confidence weighting: softmax temperature (weights None)
    teacher_softcaps: list = field(default_factory=list)  # per teacher: the cap still to apply to its logits (None: none)
    cfgs: list = field(default_factory=list)
    ce_cfg: ChunkConfig | None = None

    def __post_init__(self):
        eff = effective_kind(self.kind, self.beta)
        prm = KindParams(float(self.beta), float(self.alpha))
        self.kd_scales = [self.kd_weight * T * T for T in self.temperatures]
        caps = list(self.teacher_softcaps) or [None] * len(self.temperatures)
        self.cfgs = [ChunkConfig(kind=eff, prm=prm, temperature=float(T), student_softcap=self.student_softcap,
                                 teacher_softcap=cap, kd_weight=s, ce_weight=0.0)
                     for T, s, cap in zip(self.temperatures, self.kd_scales, caps)]
        self.ce_cfg = ChunkConfig(kind=eff, prm=prm, temperature=1.0, student_softcap=self.student_softcap,
                                  teacher_softcap=None, kd_weight=0.0, ce_weight=float(self.ce_weight))

    @property
    def n(self) -> int:
        return len(self.temperatures)


def _confidence(t_c, targets, T: float, signal: str, vocab: int, softcap: float | None) -> torch.Tensor:
    """[n] fp32: the teacher's log-probability of ``targets`` (gold_prob) or minus its entropy
    (neg_entropy), at temperature ``T``. ``t_c``: logits [n, V] (not modified) or a top-k tuple; a
    top-k teacher spreads its tail mass evenly over the other V - k tokens (a reference token outside
    its top-k gets tail / (V - k)), and its entropy is that of its k + 1 buckets."""
    if isinstance(t_c, tuple):
        ids, lp, tail = t_c
        lp = lp.float()
        if tail is None:
            tail = (1.0 - lp.exp().sum(-1)).clamp(0.0, 1.0)
        tail = tail.float()
        if signal == "gold_prob":
            hit = ids.long() == targets[:, None]
            in_top = torch.where(hit, lp, -float("inf")).amax(-1)
            rest = max(vocab - ids.shape[-1], 1)
            off = tail.clamp_min(_TINY).log() - math.log(rest)
            return torch.where(hit.any(-1), in_top, off)
        p = lp.exp()
        return (p * lp).sum(-1) + tail * tail.clamp_min(_TINY).log()
    x = t_c.float()  # a copy for non-fp32 logits; fp32 logits are only read here
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    x = x / T if T != 1.0 else x
    lse = torch.logsumexp(x, dim=-1)
    if signal == "gold_prob":
        return x.gather(-1, targets[:, None]).squeeze(-1) - lse
    logp = x - lse[:, None]
    return (logp.exp() * logp).sum(-1)


def _teacher_chunk(teacher, heads, c0: int, c1: int, vocab: int):
    """Teacher ``teacher``'s chunk at rows [c0, c1): (logits [n, V] fresh or a view, owned?) or a top-k tuple."""
    if isinstance(teacher, HiddenTeacher):
        t_w, t_b = heads[id(teacher)]
        t_c = torch.nn.functional.linear(teacher.hidden[c0:c1], t_w, t_b)
        if teacher.scale != 1.0:
            t_c = t_c.mul_(teacher.scale)
        return t_c, True
    if isinstance(teacher, TopKTeacher):
        return (teacher.ids[c0:c1], teacher.logprobs[c0:c1],
                None if teacher.tail_mass is None else teacher.tail_mass[c0:c1]), False
    return teacher[c0:c1, :vocab], False


def multi_chunk(s, teachers, heads, c0, c1, targets, weights, spec: Spec, need_grad: bool, *, meta_p=None,
                ce_mask=None):
    """One chunk of rows: ``s`` the student logits [n, V] (read, not modified). Returns
    ``(ce [n], kd [n, nt] raw, conf [n, nt] or None, w [n, nt], grad [n, V] or None, dots [nt] or None)``.

    ``weights``: the rows' weights [n, nt], or None to form them from the confidences (softmax over
    the teachers of conf / spec.conf_temperature; teachers not run get 0). ``meta_p``: ``rows_c @ G_val.T``
    [n, V] at a meta step; then ``dots[t] = sum(g_t * meta_p)``, teacher t's unweighted head-gradient
    inner product with the held-out gradient. ``ce_mask``: [n] bool or None, the rows the CE term applies
    to (the others, on-policy rows, get the teachers' KD only)."""
    n, nt = s.shape[0], spec.n
    dev = s.device
    _, ce, grad = chunk_terms(s, None, targets, None, spec.ce_cfg, need_grad, ce_mask=ce_mask)
    kd = torch.zeros((n, nt), dtype=torch.float32, device=dev)
    conf = None
    # with confidences every teacher's chunk is needed before the weights (their logits held together,
    # one chunk each); otherwise each is formed just before its use
    chunks = [None] * nt
    if spec.conf_signal is not None:
        chunks = [None if t is None else _teacher_chunk(t, heads, c0, c1, spec.vocab) for t in teachers]
        conf = torch.full((n, nt), -float("inf"), dtype=torch.float32, device=dev)
        for i, (t, ch) in enumerate(zip(teachers, chunks)):
            if ch is not None:
                cap = t.softcap if isinstance(t, HiddenTeacher) else None
                conf[:, i] = _confidence(ch[0], targets, spec.temperatures[i], spec.conf_signal, spec.vocab, cap)
    if weights is None:
        weights = torch.softmax(conf / spec.conf_temperature, dim=-1)
    dots = torch.zeros(nt, dtype=torch.float32, device=dev) if meta_p is not None else None
    for i, t in enumerate(teachers):
        if t is None:
            continue
        ch, chunks[i] = chunks[i] or _teacher_chunk(t, heads, c0, c1, spec.vocab), None
        cfg = spec.cfgs[i]
        if isinstance(t, HiddenTeacher) and t.softcap is not None:
            cfg = cfg._replace(teacher_softcap=t.softcap)
        t_c, owned = ch
        k_rows, _, g = chunk_terms(s, t_c, None, None, cfg, need_grad or meta_p is not None, teacher_owned=owned)
        del t_c
        kd[:, i] = k_rows
        if g is None:
            continue
        if dots is not None:
            dots[i] = (g * meta_p).sum()
        if need_grad:
            g.mul_(weights[:, i:i + 1])
            grad = g if grad is None else grad.add_(g)
        del g
    return ce, kd, conf, weights, grad, dots


class _Parts:
    """The detached sums of one micro-batch (what the objective logs)."""

    def __init__(self, nt: int, n: int, dev, conf: bool, meta: bool):
        z = lambda *s: torch.zeros(s, dtype=torch.float32, device=dev)  # noqa: E731
        self.ce, self.kd_weighted, self.kd_mix, self.kd, self.w = z(), z(), z(), z(nt), z(nt)
        self.conf = torch.empty((n, nt), dtype=torch.float32, device=dev) if conf else None
        self.dots = z(nt) if meta else None

    def add(self, c0, c1, ce, kd, conf, w, dots, spec: Spec):
        self.ce += ce.sum()
        scales = torch.tensor(spec.kd_scales, dtype=torch.float32, device=kd.device)
        self.kd_weighted += (kd * w * scales).sum()
        self.kd_mix += (kd * w).sum()
        self.kd += kd.sum(0)
        self.w += w.sum(0)
        if self.conf is not None:
            self.conf[c0:c1] = conf
        if dots is not None:
            self.dots += dots


class MultiLinearFunction(torch.autograd.Function):
    """Lean path: ``total = ce_weight * CE_sum + sum_rows sum_t w_t * T_t^2 * kd_weight * KD_t`` from the
    student's hidden rows and head, every teacher's chunk in the same pass. Returns ``total`` (fp32,
    differentiable w.r.t. rows, weight, bias) and a :class:`_Parts` (detached). ``ce_rows``: [N] bool or
    None, the rows CE applies to (None: all; the others get KD only)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, teachers, targets, weights, spec, meta_g, parts, ce_rows=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need = need_h or need_w or need_b
        n, vocab, dev = rows.shape[0], spec.vocab, rows.device
        w, b = weight[:vocab], None if bias is None else bias[:vocab]
        grad_h = torch.zeros_like(rows) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
        with contextlib.ExitStack() as stack:
            heads = {}
            for t in teachers:
                if isinstance(t, HiddenTeacher):
                    t_w, t_b = stack.enter_context(t.head())
                    heads[id(t)] = (t_w[:vocab], None if t_b is None else t_b[:vocab])
            for c0 in range(0, n, spec.chunk):
                c1 = min(n, c0 + spec.chunk)
                h_c = rows[c0:c1]
                s = torch.nn.functional.linear(h_c, w, b)
                if spec.scale != 1.0:
                    s = s.mul_(spec.scale)
                meta_p = None
                if meta_g is not None:  # [vocab, H]: the real vocabulary's rows (heldout_head_grad)
                    meta_p = h_c.float() @ meta_g.t()
                    if spec.scale != 1.0:
                        meta_p.mul_(spec.scale)
                ce, kd, conf, wc, g, dots = multi_chunk(
                    s, teachers, heads, c0, c1, targets[c0:c1], None if weights is None else weights[c0:c1], spec,
                    need, meta_p=meta_p, ce_mask=None if ce_rows is None else ce_rows[c0:c1])
                del s, meta_p
                parts.add(c0, c1, ce, kd, conf, wc, dots, spec)
                if g is None:
                    continue
                if spec.scale != 1.0:
                    g.mul_(spec.scale)
                if need_h:
                    grad_h[c0:c1] = (g if rows.dtype == torch.float32 else g.to(rows.dtype)) @ w
                if need_w:
                    accumulate_mm(grad_w[:vocab], g.t(), h_c)
                if need_b:
                    grad_b[:vocab] += g.sum(0)
                del g
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return spec.ce_weight * parts.ce + parts.kd_weighted

    @staticmethod
    def backward(ctx, grad_total):
        return (*forward_grads(ctx, grad_total, "multiteacher loss"), *(None,) * 7)


class MultiRowsFunction(torch.autograd.Function):
    """kd.path=logits: the same loss from the student's logits at the supervised rows ``[N, V]``."""

    @staticmethod
    def forward(ctx, s_rows, teachers, targets, weights, spec, parts):
        n, dev = s_rows.shape[0], s_rows.device
        need = ctx.needs_input_grad[0]
        grad = torch.zeros(s_rows.shape, dtype=s_rows.dtype, device=dev) if need else None
        for c0 in range(0, n, spec.chunk):
            c1 = min(n, c0 + spec.chunk)
            ce, kd, conf, wc, g, _ = multi_chunk(s_rows[c0:c1, :spec.vocab], teachers, {}, c0, c1, targets[c0:c1],
                                                 None if weights is None else weights[c0:c1], spec, need)
            parts.add(c0, c1, ce, kd, conf, wc, None, spec)
            if g is not None:
                grad[c0:c1, :spec.vocab] = g
        ctx.grad = grad
        return spec.ce_weight * parts.ce + parts.kd_weighted

    @staticmethod
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_total), None, None, None, None, None


def heldout_head_grad(rows, weight, bias, targets, *, vocab: int, chunk: int, scale: float = 1.0,
                      softcap: float | None = None):
    """``(G [vocab, H] fp32, ce_sum)``: the gradient of the summed CE of ``rows`` w.r.t. the head
    weight's rows of the real vocabulary (a padded head's extra rows take no part), a chunk at a time;
    the meta strategy's held-out direction."""
    cfg = ChunkConfig(kind="forward_kl", prm=KindParams(0.5, 0.1), temperature=1.0, student_softcap=softcap,
                      teacher_softcap=None, kd_weight=0.0, ce_weight=1.0)
    G = torch.zeros((vocab, weight.shape[1]), dtype=torch.float32, device=rows.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
    w, b = weight[:vocab], None if bias is None else bias[:vocab]
    for c0 in range(0, rows.shape[0], chunk):
        h_c = rows[c0:c0 + chunk]
        s = torch.nn.functional.linear(h_c, w, b)
        if scale != 1.0:
            s = s.mul_(scale)
        _, ce, g = chunk_terms(s, None, targets[c0:c0 + chunk], None, cfg, True, owned=True)
        ce_sum += ce.sum()
        if scale != 1.0:
            g.mul_(scale)
        accumulate_mm(G, g.t(), h_c)
    return G, ce_sum


# ------------------------------------------------------------------------------------------------
# The objective (handed to the loop by distill.multiteacher.stage)


class MultiTeacherObjective:
    """CE + per-token weighted KD to several teachers (module docstring); the interface of
    :class:`~distill.losses.objective.DistillObjective` (``ignore_index``, ``lean_request`` /
    ``lean_output`` for kd.path=lean, ``__call__`` for kd.path=logits).

    ``strategy`` (distill.multiteacher.weighting) gives each row's weights and any extra loss (the
    attention gate's). Reported (:class:`~distill.losses.objective.LossOutput`): ``total``, the
    optimised sum (CE, the weighted KD and the strategy's extra loss), and ``kd_sum``,
    ``sum_t w_t KD_t``: the weighted divergence before ``kd_weight`` and the teachers' ``T^2``. Per
    teacher (:meth:`take_sums`, through the stage's callback): its summed weight ``w_<name>``, its
    unweighted KD ``kd_<name>`` and the strategy's own sums (gate loss, meta inner products)."""

    def __init__(self, names: list[str], spec: Spec, strategy, *, ignore_index: int = -100):
        self.names, self.spec, self.strategy = list(names), spec, strategy
        self.ignore_index = ignore_index
        self._sums: dict[str, torch.Tensor] = {}

    # -- sums for the step's one all-reduce ----------------------------------------------------------
    def _log(self, parts: _Parts, extra: dict) -> None:
        vals = {f"w_{n}": parts.w[i] for i, n in enumerate(self.names)}
        vals |= {f"kd_{n}": parts.kd[i] for i, n in enumerate(self.names)}
        if parts.dots is not None:
            vals |= {f"meta_dot_{n}": parts.dots[i] for i, n in enumerate(self.names)}
        vals |= extra
        for k, v in vals.items():
            v = v.detach().reshape(())
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()

    def take_sums(self) -> dict[str, torch.Tensor]:
        """The step's device sums (keys in a fixed order, the same on every rank), then reset."""
        dev = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        keys = [f"w_{n}" for n in self.names] + [f"kd_{n}" for n in self.names] + self.strategy.sum_keys(self.names)
        out = {k: self._sums.get(k, torch.zeros((), device=dev)) for k in keys}
        self._sums = {}
        return out

    def _output(self, loss, parts: _Parts, extra_loss, n_tokens) -> LossOutput:
        total = self.spec.ce_weight * parts.ce.detach() + parts.kd_weighted.detach()
        if extra_loss is not None:
            total = total + extra_loss.detach()
        return LossOutput(loss=loss, ce_sum=parts.ce.detach(), kd_sum=parts.kd_mix.detach(), n_tokens=n_tokens,
                          total=total)

    def _check_teachers(self, teachers) -> None:
        """Each top-k teacher at its own temperature (a top-k distribution is valid only there), none
        requiring grad."""
        from distill.losses.divergences import check_teacher

        if len(teachers) != self.spec.n:
            raise ValueError(f"{len(teachers)} teacher outputs for the {self.spec.n} teachers {self.names}")
        for name, t, T in zip(self.names, teachers, self.spec.temperatures):
            if isinstance(t, (TopKTeacher, torch.Tensor)):
                try:
                    check_teacher(t, T)
                except ValueError as e:
                    raise ValueError(f"teacher {name}: {e}") from None

    # -- kd.path=lean -----------------------------------------------------------------------------------
    def lean_request(self, index, targets, teacher_rows: TeacherSet, normalizer, ce_rows=None):
        """The lean path's :class:`~distill.losses.lean.LossRequest` (as DistillObjective.lean_request);
        ``ce_rows``: [N] bool on the rows' device, the rows CE applies to (None: all); the others
        (on-policy rows) get the weighted KD only and still count in the normalizer."""
        from distill.losses.lean import LossRequest

        if not isinstance(teacher_rows, TeacherSet):
            raise TypeError(f"the multiteacher objective needs the multiteacher backend's TeacherSet, got "
                            f"{type(teacher_rows).__name__} (set kd.teacher_backend=multiteacher)")
        self._check_teachers(teacher_rows.teachers)
        for t in teacher_rows.teachers:
            if isinstance(t, TopKTeacher) and t.ids.shape[0] != targets.shape[0]:
                raise ValueError(f"top-k teacher has {t.ids.shape[0]} rows, the student {targets.shape[0]}")
        if ce_rows is not None and (ce_rows.dtype != torch.bool or ce_rows.shape != targets.shape):
            raise ValueError(f"ce_rows ({ce_rows.dtype}, {tuple(ce_rows.shape)}) must be a bool mask of the rows, "
                             f"shaped as targets {tuple(targets.shape)}")
        strategy, spec = self.strategy, self.spec

        def compute(rows, weight, bias):
            weights, aux = strategy.row_weights(rows, teacher_rows, targets)
            meta_g = strategy.meta_direction()
            parts = _Parts(spec.n, rows.shape[0], rows.device, spec.conf_signal is not None, meta_g is not None)
            total = MultiLinearFunction.apply(rows, weight, bias, teacher_rows.teachers, targets, weights, spec,
                                              meta_g, parts, ce_rows)
            extra_loss, extra = strategy.extra_loss(aux, parts)
            if extra_loss is not None:
                total = total + extra_loss
            self._log(parts, extra)
            norm = step_divisor(normalizer, total.device)
            return total / norm, parts, extra_loss

        return LossRequest(index, compute)

    def lean_output(self, loss, request) -> LossOutput:
        parts, extra_loss = request.parts
        return self._output(loss.reshape(()), parts, extra_loss, torch.tensor(request.index.numel(), device=loss.device))

    # -- kd.path=logits ---------------------------------------------------------------------------------
    def __call__(self, student_logits, teacher_out: TeacherSet, labels, normalizer) -> LossOutput:
        from distill.losses.lean import supervised_rows, topk_rows

        index, targets = supervised_rows(labels.cpu(), self.ignore_index)
        dev = student_logits.device
        index, targets = index.to(dev), targets.to(dev)
        flat = student_logits.reshape(-1, student_logits.shape[-1])
        s_rows = flat.index_select(0, index)
        self._check_teachers(teacher_out.teachers)
        teachers = []
        for t in teacher_out.teachers:
            if t is None:
                teachers.append(None)
            elif isinstance(t, TopKTeacher):
                teachers.append(topk_rows(t, index))
            else:
                teachers.append(t.reshape(-1, t.shape[-1]).index_select(0, index))
        route = teacher_out.route  # the backend's __call__ gives one per sequence
        if route is not None:
            route = route.to(dev)[index // labels.shape[1]]
        rows_set = TeacherSet(teachers, route)
        weights, aux = self.strategy.row_weights(None, rows_set, targets)
        parts = _Parts(self.spec.n, index.numel(), dev, self.spec.conf_signal is not None, False)
        total = MultiRowsFunction.apply(s_rows, teachers, targets, weights, self.spec, parts)
        extra_loss, extra = self.strategy.extra_loss(aux, parts)
        if extra_loss is not None:
            total = total + extra_loss
        self._log(parts, extra)
        norm = step_divisor(normalizer, total.device)
        return self._output(total / norm, parts, extra_loss, torch.tensor(index.numel(), device=dev))

    def __repr__(self) -> str:
        s = self.spec
        return (f"MultiTeacherObjective(teachers={self.names}, weighting={self.strategy.name}, kind={s.kind!r}, "
                f"temperatures={s.temperatures}, ce_weight={s.ce_weight}, kd_weight={s.kd_weight}, vocab={s.vocab})")

