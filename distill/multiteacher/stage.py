"""Several teachers through the core training loop: the stage's parts, a teacher backend and a dataset.

:class:`MultiTeacherStage` (a :class:`distill.train.build.StageParts`) is what ``build_trainer(cfg,
stage=MultiTeacherStage(cfg))`` gets; the run sets ``kd.teacher_backend=multiteacher`` and lists
``multiteacher.teachers``. Pieces:

* the ``multiteacher`` teacher backend (:class:`MultiTeacherBackend`): builds each listed teacher
  through the registry (``teacher_factory(b)(cfg_i, replace(ctx, teacher_path=path_i))``) with
  ``cfg_i`` a copy whose ``kd.temperature`` / ``kd.topk`` / ``kd.teacher_backend`` are the
  teacher's own (so each backend checks the vocabulary against the student's as in a
  single-teacher run), and returns a :class:`~distill.losses.multiteacher.TeacherSet` per batch.
* the ``sft_routed`` dataset: the ``sft`` dataset plus each record's ``multiteacher.route.column``
  (weighting=route).
* the stage: the objective (:class:`~distill.losses.multiteacher.MultiTeacherObjective`), the
  attention gate attached to the student before the engine is built (so DeepSpeed optimises and
  checkpoints it) and dropped from exports, and :class:`MultiTeacherCallback`: the meta weights'
  held-out pass, update and checkpoint state, and the per-teacher weights logged each step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from distill.config import MULTITEACHER_BACKEND as BACKEND_NAME
from distill.losses.multiteacher import TeacherSet
from distill.multiteacher.weighting import GATE_NAME
from distill.data.registry import DATASETS, dataset_factory
from distill.teacher.base import TeacherBackend
from distill.teacher.registry import teacher_factory
from distill.train.build import StageParts
from distill.train.callbacks import Callback

ROUTED_DATASET = "sft_routed"


def _print0(msg: str) -> None:
    """One ``[multiteacher]`` line on rank 0 (distill.dist.env.print0)."""
    from distill.dist.env import print0

    print0(f"[multiteacher] {msg}")


# ------------------------------------------------------------------------------------------------
# Backend


class MultiTeacherBackend(TeacherBackend):
    """Every listed teacher at the batch's supervised rows (``rows``) or positions (``__call__``).
    A fixed-weight-0 teacher is not built. Top-k ids of a backend that does not check its own are
    checked here, per teacher."""

    softcap = None
    topk_ids_checked = True

    def __init__(self, cfg, ctx):
        from distill.models import load as ml

        mt = cfg.multiteacher
        self.names = mt.names
        self.index = {n: i for i, n in enumerate(self.names)}
        self.route_column = mt.route.column if mt.weighting == "route" else None
        self.vocab_size = ctx.vocab_size
        skip = [mt.weighting == "fixed" and w == 0 for w in mt.fixed_weights()]
        self.children, self.paths, self.softcaps = [], [], []
        for entry, off in zip(mt.teachers, skip):
            if off:
                self.children.append(None)
                self.paths.append("")
                self.softcaps.append(None)
                _print0(f"teacher {entry.name}: fixed weight 0, not run")
                continue
            path = ml.resolve_builtin(dataclasses.replace(cfg.model, student="-", teacher=entry.path), ctx.out_dir)[1]
            factory = teacher_factory(entry.backend, key=f"multiteacher.teachers ({entry.name}): backend",
                                      hidden=(BACKEND_NAME,))
            cfg_i = copy.deepcopy(cfg)
            cfg_i.kd.temperature, cfg_i.kd.topk, cfg_i.kd.teacher_backend = entry.temperature, entry.topk, entry.backend
            cfg_i.model.teacher = entry.path
            if entry.cache_dir:
                cfg_i.kd.cache_dir = entry.cache_dir
            # where a colocated teacher lives: teacher.placement (auto: replicated; the memory model
            # decides for single-teacher runs); a ray teacher is served
            place = "ray" if entry.backend == "ray" else (
                cfg.teacher.placement if cfg.teacher.placement in ("partitioned", "replicated") else "replicated")
            child = factory(cfg_i, dataclasses.replace(ctx, teacher_path=path, teacher_placement=place))
            self.children.append(child)
            self.paths.append(path)
            self.softcaps.append(child.softcap)
            _print0(f"teacher {entry.name}: {entry.backend} {path} ({place}, T={entry.temperature:g}, "
                    f"{'top-' + str(entry.topk) if entry.topk else 'full logits'})")

    def _checked(self, i: int, out):
        from distill.losses.teacher_output import TopKTeacher

        child = self.children[i]
        if isinstance(out, TopKTeacher) and not child.topk_ids_checked:
            out.check(self.vocab_size, f"teacher {self.names[i]} (backend {type(child).__name__})")
        return out

    def _route(self, batch: dict) -> torch.Tensor | None:
        if self.route_column is None:
            return None
        if self.route_column not in batch:
            raise KeyError(f"multiteacher.weighting=route: the batch has no {self.route_column!r} field; use "
                           f"data.name={ROUTED_DATASET} (reads multiteacher.route.column from each record)")
        ids = []
        for v in batch[self.route_column]:
            ids.append(route_index(v, self.index, self.route_column))
            if self.children[ids[-1]] is None:
                raise ValueError(f"an example is routed to teacher {self.names[ids[-1]]}, which is not run")
        return torch.tensor(ids, dtype=torch.long)

    def prefetch(self, batch: dict) -> None:
        for c in self.children:
            if c is not None and c.prefetches:
                c.prefetch(batch)

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherSet:
        outs = [None if c is None else self._checked(i, c(batch)) for i, c in enumerate(self.children)]
        route = self._route(batch)
        return TeacherSet(outs, None if route is None else route.to(batch["input_ids"].device))

    @torch.no_grad()
    def rows(self, batch: dict, index: torch.Tensor) -> TeacherSet:
        outs = [None if c is None else self._checked(i, c.rows(batch, index)) for i, c in enumerate(self.children)]
        route = self._route(batch)
        if route is not None:
            route = route.to(index.device)[index // batch["input_ids"].shape[1]]
        return TeacherSet(outs, route)

    def close(self) -> None:
        for c in self.children:
            if c is not None:
                c.close()


def route_index(value, index: dict[str, int], column: str) -> int:
    """A record's teacher column (a teacher name or a 0-based index) -> the teacher's index."""
    if isinstance(value, str) and value in index:
        return index[value]
    try:
        i = int(value)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(index) or isinstance(value, bool):
        raise ValueError(f"{column}={value!r}: not a teacher name {sorted(index)} or an index 0..{len(index) - 1}")
    return i


# ------------------------------------------------------------------------------------------------
# Dataset: sft + the route column


def _raw_column(path: str, column: str, limit: int) -> list:
    """``column`` of every record of ``path`` in the order :func:`distill.data.sft.read_records` reads them
    (files of a folder sorted by name; blank JSONL lines skipped); None where a record lacks it."""
    from distill.data.sft import files_in, iter_lines

    p = Path(path)
    files = files_in(p) if p.is_dir() else [p]
    out = []
    for f in files:
        name = f.name.lower().removesuffix(".gz")
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            t = pq.read_table(f)
            out += t.column(column).to_pylist() if column in t.column_names else [None] * t.num_rows
        elif name.endswith(".json"):
            out += [r.get(column) for r in json.loads(b"".join(iter_lines(f)).decode("utf-8").lstrip("\ufeff") or "[]")]
        else:
            for raw in iter_lines(f):
                line = raw.decode("utf-8").lstrip("\ufeff")
                if line.strip():
                    out.append(json.loads(line).get(column))
    return out[:limit] if limit else out


def _routed_dataset(cfg, tokenizer, ctx):
    from distill.data.sft import DataError

    ds = dataset_factory("sft")(cfg, tokenizer, ctx)
    column = cfg.multiteacher.route.column
    values = _raw_column(cfg.data.path, column, cfg.data.limit)
    if len(values) != len(ds):
        raise DataError(f"data.path {cfg.data.path}: {len(values)} {column!r} values for {len(ds)} records")
    index = {n: i for i, n in enumerate(cfg.multiteacher.names)}
    for i, (item, v) in enumerate(zip(ds.items, values)):
        if v is None:
            raise DataError(f"{ds.records[i].where}: missing field {column!r} (multiteacher.weighting=route)")
        try:
            route_index(v, index, column)
        except ValueError as e:
            raise DataError(f"{ds.records[i].where}: {e}") from None
        item[column] = v
    return ds


DATASETS.setdefault(ROUTED_DATASET, _routed_dataset)


# ------------------------------------------------------------------------------------------------
# The stage's parts


class MultiTeacherStage(StageParts):
    """The multi-teacher run's parts for :func:`distill.train.build.build_trainer`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mt = cfg.multiteacher
        self.names = self.mt.names
        self.gate_owner = None
        self.backend: MultiTeacherBackend | None = None
        self.loss = None
        self.strategy = None

    # -- before the engine: the attention gate becomes part of the student ----------------------------
    def prepare_student(self, model, ctx) -> None:
        if self.mt.weighting != "attention":
            return
        from distill.multiteacher.weighting import TeacherGate

        ref = model.get_input_embeddings().weight
        gate = TeacherGate(model.config.hidden_size, len(self.names), self.mt.attention.hidden)
        model.add_module(GATE_NAME, gate.to(device=ctx.device, dtype=ref.dtype))
        self.gate_owner = model
        _print0(f"attention gate: {sum(p.numel() for p in gate.parameters())} parameters on the student "
                f"({GATE_NAME}.*; optimised and checkpointed with it, dropped from exports)")

    def student_state_dict(self, sd: dict) -> dict:
        return {k: v for k, v in sd.items() if not k.startswith(GATE_NAME + ".")}

    def teacher(self, cfg, ctx):
        self.backend = MultiTeacherBackend(cfg, ctx)
        return self.backend

    def prefetch_depth(self, teacher) -> int:
        # prefetch only for teachers that do something ahead of use (a Ray or cache backend)
        return int(any(c.prefetches for c in teacher.children if c is not None))

    # -- the objective ------------------------------------------------------------------------------------
    def objective(self, cfg, ctx, teacher):
        from distill.losses.divergences import default_chunk_tokens
        from distill.losses.multiteacher import MultiTeacherObjective, Spec
        from distill.multiteacher import weighting as W

        mt, k = self.mt, cfg.kd
        n = len(self.names)
        if mt.weighting == "fixed":
            strategy = W.Fixed(mt.fixed_weights())
        elif mt.weighting == "route":
            strategy = W.Route(n)
        elif mt.weighting == "confidence":
            strategy = W.Confidence(mt.confidence.signal)
        elif mt.weighting == "attention":
            strategy = W.Attention(self.gate_owner, mt.attention.entropy_bonus)
        else:
            m = mt.meta
            strategy = W.MetaWeights(n, lr=m.lr, min_weight=m.min_weight, max_logit=m.max_logit)
        self.strategy = strategy
        spec = Spec(kind=k.kind, beta=k.beta, alpha=k.alpha, temperatures=[t.temperature for t in mt.teachers],
                    ce_weight=k.ce_weight, kd_weight=k.kd_weight, vocab=ctx.vocab_size,
                    chunk=k.chunk_tokens or default_chunk_tokens(ctx.vocab_size), conf_signal=strategy.conf_signal,
                    conf_temperature=mt.confidence.temperature, teacher_softcaps=teacher.softcaps)
        self.loss = MultiTeacherObjective(self.names, spec, strategy)
        _print0(f"objective: {self.loss!r}")
        return self.loss

    def callbacks(self, cfg, ctx, student) -> list:
        heldout = None
        if self.strategy.name == "meta":
            heldout = self._heldout_set(cfg, ctx)
        return [MultiTeacherCallback(self.names, self.mt, self.loss, self.strategy, student=student, heldout=heldout,
                                     pad_id=ctx.tokenizer.pad_token_id, seed=cfg.train.seed,
                                     chunk=cfg.kd.chunk_tokens, vocab=ctx.vocab_size)]

    def _heldout_set(self, cfg, ctx):
        m = self.mt.meta
        if not m.heldout_path:
            _print0("meta: held-out batches drawn from the training data (set multiteacher.meta.heldout_path "
                    "for a real held-out set)")
            return ctx.dataset
        from distill.data.sft import SFTDataset, read_records

        d = cfg.data
        recs = read_records(m.heldout_path, "auto", prompt_field=d.prompt_field, response_field=d.response_field)
        return SFTDataset(recs, ctx.tokenizer, d.max_len, d.add_eos)


class MultiTeacherCallback(Callback):
    """Per step: the meta weights' held-out pass (before the step) and update (after it), the
    per-teacher weights and divergences in the record, the strategy's checkpoint state."""

    def __init__(self, names, mt, loss, strategy, *, student, heldout, pad_id: int, seed: int, chunk: int, vocab: int):
        self.names, self.mt, self.loss, self.strategy = names, mt, loss, strategy
        self.student, self.heldout, self.pad_id, self.seed = student, heldout, pad_id, seed
        self.chunk, self.vocab = chunk, vocab
        self._meta_info: dict | None = None

    def begin_step(self, step: int, lr: float) -> None:
        self._meta_info = None
        if self.strategy.name != "meta" or step % self.mt.meta.every:
            return
        self._meta_info = {"lr": lr, **self._heldout_direction(step)}

    def _heldout_direction(self, step: int) -> dict:
        """The mean held-out CE gradient of the student's head, ``G_val [vocab, H]`` (fp32), set as the
        strategy's direction for this step; the same examples on every rank (seeded by the update)."""
        from distill.data.batching import model_inputs
        from distill.data.sft import collate
        from distill.losses.divergences import default_chunk_tokens
        from distill.losses.lean import LossRequest, supervised_rows
        from distill.losses.multiteacher import heldout_head_grad
        from distill.train.batches import to_device

        st, m = self.student, self.mt.meta
        t0 = time.perf_counter()
        ds = self.heldout
        g = torch.Generator().manual_seed(self.seed * 7919 + step // m.every)
        pick = torch.randperm(len(ds), generator=g)[:m.heldout_batch].tolist()
        cpu = collate([ds[i] for i in pick], self.pad_id)
        index, targets = supervised_rows(cpu["labels"], -100)
        batch = to_device(cpu, st.device)
        index, targets = index.to(st.device), targets.to(st.device)
        vocab = self.vocab
        chunk = self.chunk or default_chunk_tokens(vocab)

        def compute(rows, weight, bias):
            G, ce = heldout_head_grad(rows, weight, bias, targets, vocab=vocab, chunk=chunk)
            return ce, G, ce

        req = LossRequest(index, compute)
        with torch.no_grad(), st.lean_head.pending(req):
            st.engine.forward(**model_inputs(batch), use_cache=False)
        G, ce = req.parts
        n = max(int(index.numel()), 1)
        self.strategy.direction = G.div_(n)
        return {"heldout_ce_sum": ce, "heldout_tokens": n, "meta_s": time.perf_counter() - t0}

    def step_sums(self) -> dict:
        return self.loss.take_sums()

    def end_step(self, rec: dict, sums: dict) -> None:
        ntok = max(rec["response_tokens"], 1)
        for n in self.names:
            rec[f"w_{n}"] = sums.get(f"w_{n}", 0.0) / ntok
            rec[f"kd_{n}"] = sums.get(f"kd_{n}", 0.0) / ntok
        if self.strategy.name == "attention":
            rec["gate_nll"] = sums.get("gate_nll", 0.0) / ntok
            rec["gate_entropy"] = sums.get("gate_entropy", 0.0) / ntok
        info = self._meta_info
        if info is not None:
            s = self.strategy
            g = s.update([sums.get(f"meta_dot_{n}", 0.0) for n in self.names], ntok, info["lr"])
            s.direction = None
            rec["meta_update"] = True
            rec["meta_s"] = info["meta_s"]  # the held-out pass (host time; the inner products run in the step)
            rec["heldout_ce"] = float(info["heldout_ce_sum"]) / info["heldout_tokens"]
            for n, gi, wi in zip(self.names, g, s.weights.tolist()):
                rec[f"meta_grad_{n}"] = gi
                rec[f"lambda_{n}"] = wi
            self._meta_info = None

    def line_extra(self, rec: dict) -> str:
        return " | w " + " ".join(f"{n}={rec.get(f'w_{n}', 0.0):.2f}" for n in self.names)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.strategy is not None and self.strategy.name == "meta":
            return {"meta": self.strategy.state_dict(), "names": list(self.names)}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if "meta" in state and self.strategy is not None and self.strategy.name == "meta":
            if state.get("names") != list(self.names):
                raise ValueError(f"checkpoint meta weights are for teachers {state.get('names')}, this run has {self.names}")
            self.strategy.load_state_dict(state["meta"])


def make_trainer(cfg, argv=None):
    """The run's Trainer with the multi-teacher stage's parts (then ``.train()``)."""
    from distill.train.build import build_trainer

    return build_trainer(cfg, argv=argv, stage=MultiTeacherStage(cfg))
