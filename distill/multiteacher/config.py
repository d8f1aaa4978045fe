"""The ``multiteacher:`` section of a run: the teachers and how their KD terms are weighted.

One entry per teacher (``multiteacher.teachers``, a YAML list of mappings); the weighting strategy
and its knobs in sub-sections. ``RunConfig.validate`` calls :meth:`MultiTeacherSection.validate`
with the whole run config (cross-field checks: kd.teacher_backend, kd.path, data.packing).
"""

from __future__ import annotations

import dataclasses
import math

STRATEGIES = ("fixed", "route", "confidence", "attention", "meta")
BACKEND_NAME = "multiteacher"  # kd.teacher_backend of a multi-teacher run


def _check(cond: bool, msg: str) -> None:
    if not cond:
        # imported here: distill.config imports this module while it is being built
        from distill.config import ConfigError

        raise ConfigError(msg)


@dataclasses.dataclass
class TeacherEntry:
    name: str = ""  # short name (logged as w_<name>, kd_<name>); unique
    path: str = ""  # HF folder / hub name ("builtin" = the built-in tiny teacher); cache backend: as that backend reads model.teacher
    backend: str = "colocated"  # teacher backend registry name: colocated | ray | cache (constructed with this teacher's path, temperature and topk)
    temperature: float = 1.0  # this teacher's KD temperature (its term is scaled by temperature^2)
    topk: int = 0  # k of a top-k backend (0 = full logits; cache and ray need k > 0)
    cache_dir: str = ""  # backend=cache: this teacher's top-k folder ("" = kd.cache_dir)
    weight: float = 1.0  # weighting=fixed: this teacher's weight (the weights are normalised to sum 1)


@dataclasses.dataclass
class RouteSection:
    column: str = "teacher_id"  # data field naming each example's teacher (a teacher name or 0-based index; TRL's convention)


@dataclasses.dataclass
class ConfidenceSection:
    signal: str = "gold_prob"  # gold_prob (the teacher's log-probability of the reference token) | neg_entropy (minus its entropy)
    temperature: float = 0.5  # softmax temperature over the teachers' confidences (smaller = sharper)


@dataclasses.dataclass
class AttentionSection:
    entropy_bonus: float = 0.01  # weight of the gate's entropy (per token) subtracted from its loss: keeps it from collapsing early
    hidden: int = 0  # gate hidden width (0 = one linear layer H -> n_teachers)


@dataclasses.dataclass
class MetaSection:
    every: int = 10  # meta update every N optimizer steps
    lr: float = 0.1  # Adam step size on the teachers' weight logits (log-weight units per update)
    min_weight: float = 0.02  # floor of every teacher's weight (bounds: [min_weight, 1 - (n-1) min_weight])
    max_logit: float = 6.0  # the weight logits are clipped to [-max_logit, max_logit]
    heldout_path: str = ""  # held-out (prompt, response) JSONL for the meta objective ("" = a seeded draw from the training data)
    heldout_batch: int = 8  # held-out sequences per meta update (the same on every rank)


@dataclasses.dataclass
class MultiTeacherSection:
    teachers: list[TeacherEntry] = dataclasses.field(default_factory=list)  # the teachers, each {name, path, backend, temperature, topk, cache_dir, weight} ([] = single-teacher run); needs kd.teacher_backend=multiteacher
    weighting: str = "fixed"  # fixed | route | confidence | attention | meta
    route: RouteSection = dataclasses.field(default_factory=RouteSection)
    confidence: ConfidenceSection = dataclasses.field(default_factory=ConfidenceSection)
    attention: AttentionSection = dataclasses.field(default_factory=AttentionSection)
    meta: MetaSection = dataclasses.field(default_factory=MetaSection)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def fixed_weights(self) -> list[float]:
        s = sum(t.weight for t in self.teachers)
        return [t.weight / s for t in self.teachers]

    def validate(self, run) -> None:
        """Checks of this section and its fit with the run (``run``: the RunConfig)."""
        k = run.kd
        # the strategy and its knobs are checked with or without teachers: a misspelt name is never ignored
        _check(self.weighting in STRATEGIES, f"multiteacher.weighting={self.weighting!r}: one of {list(STRATEGIES)}")
        c, a, m = self.confidence, self.attention, self.meta
        _check(c.signal in ("gold_prob", "neg_entropy"),
               f"multiteacher.confidence.signal={c.signal!r}: gold_prob | neg_entropy")
        _check(c.temperature > 0 and math.isfinite(c.temperature),
               f"multiteacher.confidence.temperature={c.temperature} must be > 0")
        _check(a.entropy_bonus >= 0 and math.isfinite(a.entropy_bonus) and a.hidden >= 0,
               f"multiteacher.attention.entropy_bonus={a.entropy_bonus} and .hidden={a.hidden} must be >= 0")
        _check(m.every >= 1 and m.heldout_batch >= 1,
               f"multiteacher.meta.every={m.every} and .heldout_batch={m.heldout_batch} must be >= 1")
        _check(m.lr > 0 and math.isfinite(m.lr), f"multiteacher.meta.lr={m.lr} must be > 0")
        _check(m.max_logit > 0 and math.isfinite(m.max_logit), f"multiteacher.meta.max_logit={m.max_logit} must be > 0")
        _check(bool(self.route.column.strip()), "multiteacher.route.column is empty: name the data field of each "
                                                "example's teacher (e.g. teacher_id)")
        if not self.teachers:
            _check(k.teacher_backend != BACKEND_NAME,
                   f"kd.teacher_backend={BACKEND_NAME} needs multiteacher.teachers (a list of {{name, path, backend, "
                   f"temperature, weight}})")
            return
        _check(k.teacher_backend == BACKEND_NAME,
               f"multiteacher.teachers lists {len(self.teachers)} teacher(s) but kd.teacher_backend="
               f"{k.teacher_backend!r}: set kd.teacher_backend={BACKEND_NAME}")
        _check(k.kind not in ("none",), "multiteacher.teachers with kd.kind=none: set a divergence (e.g. forward_kl)")
        from distill.config import registered_names

        backends = [b for b in registered_names("teacher_backends") if b != BACKEND_NAME]
        names = self.names
        _check(all(names), f"multiteacher.teachers: every teacher needs a name, got {names}")
        _check(len(set(names)) == len(names), f"multiteacher.teachers: names must be unique, got {names}")
        for i, t in enumerate(self.teachers):
            w = f"multiteacher.teachers[{i}] ({t.name})"
            _check(bool(t.path), f"{w}: path is empty")
            _check(t.backend != BACKEND_NAME, f"{w}: backend={t.backend} (a teacher cannot be a multiteacher)")
            _check(t.backend in backends, f"{w}: backend={t.backend!r} is not a teacher backend; known: {backends}")
            _check(t.temperature > 0 and math.isfinite(t.temperature), f"{w}: temperature={t.temperature} must be > 0")
            _check(t.topk >= 0, f"{w}: topk={t.topk} must be >= 0")
            _check(t.backend not in ("cache", "ray") or t.topk > 0, f"{w}: backend={t.backend} serves top-k: set topk")
            _check(t.weight >= 0 and math.isfinite(t.weight), f"{w}: weight={t.weight} must be >= 0")
        caches = [t.cache_dir or k.cache_dir for t in self.teachers if t.backend == "cache"]
        _check(len(set(caches)) == len(caches),
               f"multiteacher.teachers: {len(caches)} cache teachers share the top-k folder(s) {sorted(set(caches))}: "
               f"give each its own cache_dir")
        if self.weighting == "fixed":
            _check(sum(t.weight for t in self.teachers) > 0,
                   f"multiteacher.weighting=fixed: the weights {[t.weight for t in self.teachers]} sum to 0")
        _check(0 <= m.min_weight * len(self.teachers) < 1,
               f"multiteacher.meta.min_weight={m.min_weight} x {len(self.teachers)} teachers must be in [0, 1)")
        if self.weighting in ("attention", "meta"):
            _check(k.path == "lean", f"multiteacher.weighting={self.weighting} reads the student's final hidden "
                                     f"states at the supervised rows: it needs kd.path=lean, got {k.path}")
        if self.weighting == "route":
            _check(not run.data.packing, "multiteacher.weighting=route reads a per-example teacher column: "
                                         "data.packing=true merges examples; turn packing off")
            _check(run.data.name != "sft", f"multiteacher.weighting=route reads each example's "
                                           f"{self.route.column!r} field: set data.name=sft_routed (data.name=sft "
                                           f"drops it)")
