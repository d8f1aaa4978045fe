"""How each supervised row's teacher weights are formed (``multiteacher.weighting``).

Every strategy gives, per row, weights over the teachers that sum to 1 (docs/multiteacher.md):

* ``fixed``: the user's weights, normalised; a teacher of weight 0 is not run at all.
* ``route``: one-hot from each example's teacher column (TRL's ``teacher_id`` convention).
* ``confidence``: ``softmax_t(c_t(row) / tau)`` with ``c_t`` teacher t's log-probability of the
  reference token (``gold_prob``) or minus its entropy (``neg_entropy``) at its temperature, formed
  inside the loss's chunk loop.
* ``attention``: a gate (:class:`TeacherGate`, a linear layer or a small MLP, a submodule of the
  student so DeepSpeed optimises, partitions and checkpoints it) reads the student's final hidden
  state at the row (detached) and outputs ``w = softmax(gate(h))``; the KD term uses ``w``
  detached, and the gate is trained by ``-log sum_t w_t p_t(y) - entropy_bonus * H(w)``: the weights
  under which the teachers' mixture best explains the reference token ``y``.
* ``meta``: per-teacher weights ``lambda = m + (1 - n m) softmax(a)`` updated every N steps by Adam
  on ``a`` from a first-order, last-layer meta-gradient (:class:`MetaWeights`).
"""

from __future__ import annotations

import math

import torch


class Strategy:
    """The interface the objective calls, with the defaults of a strategy without learned state.

    ``row_weights(rows, teachers, targets)`` -> ``(weights [N, n] or None, aux)``: None asks the loss
    loop to form them from the confidences (``conf_signal``); ``extra_loss(aux, parts)`` ->
    ``(loss sum or None, logged sums)``; ``meta_direction()``: the held-out head gradient during a
    meta update step, else None; ``sum_keys(names)``: the names of the logged sums, in order."""

    name = "?"
    conf_signal: str | None = None  # the confidences the loss loop must return (None: none)

    def row_weights(self, rows, teachers, targets):
        raise NotImplementedError

    def extra_loss(self, aux, parts):
        return None, {}

    def meta_direction(self):
        return None

    def sum_keys(self, names):
        return []


class Fixed(Strategy):
    name = "fixed"

    def __init__(self, weights: list[float]):
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def row_weights(self, rows, teachers, targets):
        w = self.weights.to(targets.device)
        return w.expand(targets.shape[0], w.shape[0]), None


class Route(Strategy):
    name = "route"

    def __init__(self, n: int):
        self.n = n

    def row_weights(self, rows, teachers, targets):
        if teachers.route is None:
            raise RuntimeError("multiteacher.weighting=route: the batch carries no teacher ids (data.name=sft_routed "
                               "reads them from the multiteacher.route.column field)")
        return torch.nn.functional.one_hot(teachers.route.to(targets.device).long(), self.n).float(), None


class Confidence(Strategy):
    name = "confidence"

    def __init__(self, signal: str):
        self.conf_signal = signal

    def row_weights(self, rows, teachers, targets):
        return None, None  # formed from the confidences inside the chunk loop


class TeacherGate(torch.nn.Module):
    """``h [N, H] -> logits [N, n_teachers]``: one linear layer (``hidden`` 0) or Linear-GELU-Linear.
    Zero-initialised output layer: the gate starts at equal weights."""

    def __init__(self, hidden_size: int, n_teachers: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.inner = torch.nn.Linear(hidden_size, hidden)
            self.out = torch.nn.Linear(hidden, n_teachers)
        else:
            self.inner = None
            self.out = torch.nn.Linear(hidden_size, n_teachers)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.out.weight.dtype)
        if self.inner is not None:
            x = torch.nn.functional.gelu(self.inner(x))
        return self.out(x).float()


GATE_NAME = "multiteacher_gate"  # the gate's submodule name on the student (its state-dict prefix)


class Attention(Strategy):
    name = "attention"
    conf_signal = "gold_prob"

    def __init__(self, gate_owner: torch.nn.Module, entropy_bonus: float):
        # the module that holds the gate (the student, or the engine's wrapped student): looked up by
        # name at each call so the call goes through the module DeepSpeed hooked
        self.owner, self.entropy_bonus = gate_owner, float(entropy_bonus)

    def row_weights(self, rows, teachers, targets):
        if rows is None:
            raise RuntimeError("multiteacher.weighting=attention reads the student's hidden rows: kd.path=lean")
        logits = getattr(self.owner, GATE_NAME)(rows.detach())
        return torch.softmax(logits.detach(), dim=-1), logits

    def extra_loss(self, logits, parts):
        log_w = torch.log_softmax(logits, dim=-1)
        # teachers not run have conf -inf: they never explain the token
        nll = -torch.logsumexp(log_w + parts.conf, dim=-1)
        ent = -(log_w.exp() * log_w).sum(-1)
        loss = nll.sum() - self.entropy_bonus * ent.sum()
        return loss, {"gate_nll": nll.sum().detach(), "gate_entropy": ent.sum().detach()}

    def sum_keys(self, names):
        return ["gate_nll", "gate_entropy"]


class MetaWeights(Fixed):  # Fixed's row_weights, with the weights property below
    """Teacher weights from their meta-gradient, identical on every rank.

    ``lambda = m + (1 - n m) softmax(a)`` (so each weight stays in ``[m, 1 - (n-1) m]``), ``a`` clipped
    to ``[-max_logit, max_logit]``. At an update step the hooks set :attr:`direction`, the mean
    held-out CE gradient of the head ``G_val [vocab, H]`` (the real vocabulary's rows); the loss loop then sums, over the step's
    micro-batches, ``<G_val, dL_t/dW>`` with ``L_t = kd_weight T_t^2 KD_t`` teacher t's unweighted
    KD term (all ranks: it rides the step's all-reduce). The first-order meta-gradient of the
    held-out loss after this step's update ``W' = W - eta dL/dW``, through the head only, is
    ``dL_val(W')/d lambda_t = -eta <G_val, dL_t/dW> / N``; the chain rule through the softmax gives
    ``d/da``, and Adam (betas 0.9, 0.999) takes a step of ``lr`` on ``a``. The weights the next step
    uses are the updated ones. Kept in float64 on the CPU (the update is the same on every rank)."""

    name = "meta"

    def __init__(self, n: int, *, lr: float, min_weight: float, max_logit: float):
        self.n, self.lr, self.min_weight, self.max_logit = n, float(lr), float(min_weight), float(max_logit)
        self.a = torch.zeros(n, dtype=torch.float64)
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.t = 0
        self.direction: torch.Tensor | None = None  # G_val during an update step

    @property
    def weights(self) -> torch.Tensor:
        return (self.min_weight + (1.0 - self.n * self.min_weight) * torch.softmax(self.a, 0)).float()

    def meta_direction(self):
        return self.direction

    def sum_keys(self, names):
        return [f"meta_dot_{n}" for n in names]

    def update(self, dots: list[float], n_tokens: float, eta: float) -> list[float]:
        """One meta step from the summed inner products; returns dL_val/dlambda per teacher."""
        g_lam = torch.tensor(dots, dtype=torch.float64) * (-eta / max(n_tokens, 1.0))
        s = torch.softmax(self.a, 0)
        g_a = (1.0 - self.n * self.min_weight) * s * (g_lam - (s * g_lam).sum())
        b1, b2, eps = 0.9, 0.999, 1e-30  # eps ~ 0: the step is scale-free (g is O(eta / N))
        self.t += 1
        self.m.mul_(b1).add_(g_a, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g_a, g_a, value=1 - b2)
        m_hat, v_hat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        self.a.sub_(self.lr * m_hat / (v_hat.sqrt() + eps)).clamp_(-self.max_logit, self.max_logit)
        return g_lam.tolist()

    def state_dict(self) -> dict:
        return {"a": self.a.clone(), "m": self.m.clone(), "v": self.v.clone(), "t": self.t}

    def load_state_dict(self, st: dict) -> None:
        self.a, self.m, self.v, self.t = st["a"].clone(), st["m"].clone(), st["v"].clone(), int(st["t"])


def entropy_of(weights: list[float]) -> float:
    return -sum(w * math.log(w) for w in weights if w > 0)
