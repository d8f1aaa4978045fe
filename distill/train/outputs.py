"""What a run leaves behind besides checkpoints: the metrics log, the exported student and its
SentiBench scores (during training and at the end)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distill.config import to_dict
from distill.dist import env as distenv
from distill.dist.env import print0
from distill.train.checkpoint import RunWriteError, failed_write


class RunLog:
    """Rank 0's records: metrics.jsonl (one JSON line per logged step and per evaluation; a failed
    write stops the run in one line) and the reporters of ``log.report_to``."""

    def __init__(self, path: Path, checkpointer, reporter):
        self.path, self.checkpointer, self.reporter = path, checkpointer, reporter

    def step(self, record: dict, step: int) -> None:
        self.checkpointer.append_metrics0(self.path, record)
        self.reporter.log(record, step)

    def eval(self, result: dict, step: int) -> None:
        self.checkpointer.append_metrics0(self.path, {"step": step, "eval": result})
        self.reporter.log_eval(result, step)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None


class RunOutputs:
    """The trained student's export and evaluation. ``cfg`` is the run's config (its ``eval``,
    ``model`` and ``run`` sections, and the model card's settings); ``student_state_dict`` turns the
    gathered state dict into the exported model's (a stage drops the modules it attached)."""

    def __init__(self, cfg, *, env, device, engine, model_config, generation_config, tokenizer, student_path: str,
                 teacher_path: str, out_dir: Path, checkpointer, log: RunLog, student_state_dict=lambda sd: sd):
        self.cfg, self.env, self.device, self.engine = cfg, env, device, engine
        self.model_config, self.generation_config, self.tokenizer = model_config, generation_config, tokenizer
        self.student_path, self.teacher_path, self.out_dir = student_path, teacher_path, out_dir
        self.checkpointer, self.log, self.student_state_dict = checkpointer, log, student_state_dict

    def gathered_state_dict(self) -> dict | None:
        """The student's full state dict on rank 0 (None elsewhere; a collective under ZeRO-3), without
        the modules a stage attached to it (``student_state_dict``)."""
        sd = self.engine.gather_state_dict()
        return sd if sd is None else self.student_state_dict(sd)

    def export(self, step: int, out: str | Path | None = None) -> Path:
        """The student as a Hugging Face folder (``<out_dir>/export`` by default), model card included;
        a failed write stops every rank with one line naming the last intact checkpoint."""
        from distill.models.export import card_metadata, export_hf

        out = Path(out) if out else self.out_dir / "export"
        sd = self.gathered_state_dict()
        why = None
        if self.env.is_main:
            info = json.dumps({"step": step, "student_init": self.student_path, "teacher": self.teacher_path,
                               "config": to_dict(self.cfg)}, indent=2)
            card = card_metadata(self.cfg, step=step, student=self.student_path, teacher=self.teacher_path,
                                 metrics_path=self.out_dir / "metrics.jsonl")
            why = failed_write(lambda: export_hf(sd, self.model_config, self.tokenizer, out,
                                                  generation_config=self.generation_config,
                                                  extra_files={"distill_run.json": info}, card=card), out.parent)
            if why is not None:
                # export_hf writes a .tmp-<name>-<pid> folder and renames it: the partial one holds space
                for partial in out.parent.glob(f".tmp-{out.name}-{os.getpid()}"):
                    shutil.rmtree(partial, ignore_errors=True)
                why = self.checkpointer.write_stop0(f"student not exported to {out}", why, export_to=out)
            else:
                print0(f"[trainer] exported student to {out}")
        why = distenv.broadcast_object0(why)  # also the barrier after rank 0's export
        if why is not None:
            raise RunWriteError(why)
        return out

    def evaluate(self, step: int, final: bool = False) -> dict | None:
        """SentiBench (``eval.limit`` examples per task) with the gathered student: during training on
        each task's validation split where it has one (its test split otherwise), at the end
        (``final``) on the test split, then also written as ``<out_dir>/sentibench/results.json``
        (+ ``.md``, ``.png``; what ``sentibench plot`` reads).

        Rank 0 holds the gathered weights and scores every prompt alone (``local=True``: its runner
        calls no collective, so it cannot wait on ranks that are not evaluating); the other ranks wait
        at the barrier. Scores under N ranks equal 1 rank's
        (tests/trainer/test_dist.py::test_zero3_two_ranks_match_single_process)."""
        sd = self.gathered_state_dict()
        result = None
        if self.env.is_main:
            from transformers import AutoModelForCausalLM

            from distill.data.sentibench import resolve_tasks, task_file
            from distill.eval.sentibench import evaluate, write_results

            e = self.cfg.eval
            tasks = resolve_tasks(e.tasks)
            split = "test" if final else {t: "val" if task_file(t, "val").is_file() else "test" for t in tasks}
            model = AutoModelForCausalLM.from_config(self.model_config)
            load_state_dict_strict(model, sd, what=f"the gathered student of {self.student_path}")
            model.to(self.device).eval()
            run_name = self.cfg.run.name or self.out_dir.name
            result = evaluate(model, self.tokenizer, tasks=tasks, shots=e.shots, seeds=(42,), split=split,
                              limit=e.limit or None, batch_size=e.batch_size, local=True,
                              model_name=f"{run_name} (step {step})")
            self.log.eval(result, step)
            scores = {t: None if v.get("score") is None else round(float(v["score"]), 2)
                      for t, v in (result.get("tasks") or {}).items()}
            where = result["split"] if isinstance(result["split"], str) else "val where present, else test"
            print0(f"[trainer] eval at step {step} ({where} split): {scores}")
            del model
            if final:
                paths = write_results(result, self.out_dir / "sentibench")
                print0(f"[trainer] SentiBench results: {paths['json']} (sentibench plot {paths['json']} draws them)")
                if e.teacher and self.teacher_path:
                    self._evaluate_teacher0(result, tasks, split)
        distenv.barrier()
        return result

    def _evaluate_teacher0(self, student: dict, tasks, split) -> None:
        """Rank 0, with ``eval.teacher``: the teacher on the student's final slice, written as
        ``sentibench/teacher/results.json``; the student's results.md / .png then show both."""
        from distill.eval.report import plot_results, results_markdown
        from distill.eval.sentibench import evaluate, write_results
        from distill.models import load as ml

        e, m = self.cfg.eval, self.cfg.model
        on_gpu = self.device.type == "cuda"
        teacher = ml.load_causal_lm(self.teacher_path, dtype=ml.resolve_dtype(m.teacher_dtype_name(), on_gpu),
                                    attn=ml.resolve_attn(m.attn, on_gpu), device=str(self.device),
                                    trust_remote_code=m.trust_remote_code, what="teacher folder (model.teacher)")
        teacher.eval()
        # the student's tokenizer: token-level KD already requires the two to agree
        res = evaluate(teacher, self.tokenizer, tasks=tasks, shots=e.shots, seeds=(42,), split=split, limit=e.limit or None,
                       batch_size=e.batch_size, local=True, model_name=f"teacher {Path(str(self.teacher_path)).name}")
        del teacher
        out = self.out_dir / "sentibench"
        write_results(res, out / "teacher")
        (out / "results.md").write_text(results_markdown([student, res]), encoding="utf-8")
        plot_results([student, res], out / "results.png")
        t = res["overall"].get("score")
        print0(f"[trainer] teacher on the same slice: overall {None if t is None else round(float(t), 2)} "
               f"({out / 'teacher' / 'results.json'}; {out / 'results.png'} shows both)")


def load_state_dict_strict(model: torch.nn.Module, sd: dict, *, what: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` but for the two ways a gathered state dict may
    legitimately differ from ``model.state_dict()``: a key absent because it is a tied alias of a
    present one (``lm_head.weight`` of a ``tie_word_embeddings`` model, dropped by savers that store
    shared storage once) is filled from that key, and a non-persistent buffer of the model (rebuilt
    from the config at construction) is dropped. Any other missing or unexpected key, or tied aliases
    with different values, is a one-line error naming the keys and the model config."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    alias_of = {n: names for names in groups.values() if len(names) > 1 for n in names}
    non_persistent = {f"{mod}.{b}" if mod else b for mod, m in model.named_modules(remove_duplicate=False)
                      for b in m._non_persistent_buffers_set}
    expected = list(model.state_dict())
    sd = {k: v for k, v in sd.items() if k not in non_persistent}
    conflicts = []
    for k in expected:
        present = [a for a in alias_of.get(k, ()) if a in sd]
        if k not in sd and present:
            sd[k] = sd[present[0]]
        elif k in sd and any(sd[a] is not sd[k] and not torch.equal(sd[a], sd[k]) for a in present if a != k):
            conflicts.append(k)
    keys = set(expected)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in keys]
    if missing or unexpected or conflicts:
        def few(names):
            return f"{len(names)} {names[:4]}{' ...' if len(names) > 4 else ''}"

        c = model.config
        shape = ", ".join(f"{f}={getattr(c, f, None)}" for f in ("model_type", "hidden_size", "num_hidden_layers",
                                                                 "vocab_size", "tie_word_embeddings"))
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"tied in the model but different {few(conflicts)}" if conflicts else ""]
        raise RuntimeError(f"{what}: state dict does not fit {type(model).__name__}({shape}): "
                           f"{'; '.join(x for x in parts if x)}")
    model.load_state_dict(sd, strict=True)
    model.tie_weights()  # a no-op when the aliases share one Parameter, as from_config builds them
