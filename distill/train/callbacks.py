"""Callbacks: what a stage or the run adds to each optimizer step without holding the loop.

The loop calls, on every rank, in this order:

* ``begin_step(step, lr)`` before the step's first micro-batch (``step``: optimizer steps done);
* ``step_sums()`` after its last micro-batch: named device scalars accumulated during the step; they
  ride the step's one all-reduce (no extra host sync) and come back summed over ranks to
* ``end_step(record, sums)``, which adds logged values to the step's record; ``line_extra(record)``
  is appended to the step's progress line;
* ``after_step(step)`` once the step is logged and checkpointed (periodic evaluation);
* ``on_train_end(step, result)`` when training ends normally (final evaluation, export), and
  ``close()`` however it ends.

``state_dict()`` / ``load_state_dict(state)``: a callback's own state (the same on every rank), saved
in each checkpoint (``hooks_state.pt``, all callbacks' states merged into one dict) and handed whole to
every callback on resume. A callback gets what it needs when it is built (an engine, a strategy,
the run's outputs), never the loop.
"""

from __future__ import annotations

import torch


class Callback:
    """Every method's default does nothing (see the module docstring)."""

    def begin_step(self, step: int, lr: float) -> None:
        pass

    def step_sums(self) -> dict[str, torch.Tensor]:
        return {}

    def end_step(self, record: dict, sums: dict[str, float]) -> None:
        pass

    def line_extra(self, record: dict) -> str:
        return ""

    def after_step(self, step: int) -> None:
        pass

    def on_train_end(self, step: int, result: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EvalCallback(Callback):
    """SentiBench during training every ``every`` steps (0: never) and, with ``at_end``, on the test
    split when training ends, through the run's :class:`~distill.train.outputs.RunOutputs`."""

    def __init__(self, outputs, *, every: int, at_end: bool):
        self.outputs, self.every, self.at_end = outputs, every, at_end

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.outputs.evaluate(step)

    def on_train_end(self, step: int, result: dict) -> None:
        if self.at_end:  # before the export, whose model card shows these scores
            result["eval"] = self.outputs.evaluate(step, final=True)


class ExportCallback(Callback):
    """The trained student exported as a Hugging Face folder when training ends (``checkpoint.export``)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def on_train_end(self, step: int, result: dict) -> None:
        result["export"] = str(self.outputs.export(step))


class StallWatch:
    """Watches for a run that trains nothing: ``n`` optimizer steps in a row whose gradient norm is 0
    or whose loss did not move (relative change <= 1e-7) give one warning, once per run."""

    def __init__(self, n: int):
        self.n = n
        self.prev: float | None = None  # the previous step's loss
        self.count = 0  # steps in the current run of such steps
        self.first = 0  # its first step
        self.all_zero = self.all_still = True  # every step of it had a zero norm / an unmoved loss
        self.warned = False

    def update(self, step: int, loss: float, grad_norm: float | None) -> str | None:
        """Step ``step``'s numbers; the warning text the first time the streak reaches ``n``, else None."""
        zero = grad_norm is not None and grad_norm == 0.0
        still = self.prev is not None and abs(loss - self.prev) <= 1e-7 * max(1.0, abs(loss))
        self.prev = loss
        if not (zero or still):
            self.count = 0
            return None
        if self.count == 0:
            # the streak's first step is compared with the step before it, which may have moved: its
            # own "still" counts only when the streak is that one step
            self.first, self.all_zero, self.all_still = step, zero, still
        else:
            self.all_zero &= zero
            self.all_still = still if self.count == 1 else self.all_still and still
        self.count += 1
        if self.warned or self.count < self.n:
            return None
        self.warned = True
        what = " and ".join(x for x, on in (("the gradient norm was 0", self.all_zero),
                                            (f"the loss did not move from {loss:.6g}", self.all_still)) if on) or \
            "the gradient norm was 0 or the loss did not move"
        return (f"steps {self.first}-{step}: {what} ({self.n} steps in a row): nothing is being trained. Likely causes: "
                f"a learning rate of 0, every student parameter frozen (requires_grad=False), or every label masked "
                f"(-100, no response token in the batches); check the schedule, the model set-up and the data")
