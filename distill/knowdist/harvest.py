"""KnowDist harvesting: the teacher analyses unlabeled texts from several perspectives.

``harvest(cfg) -> corpus_dir`` reads texts (SentiBench train splits by default, or JSONL, a text
file, a ``datasets`` name), crosses them with the perspectives (:mod:`perspectives.yaml` plus the
user's YAML), asks the teacher (Ray :class:`TeacherService` or in-process :class:`LocalTeacher`) to
write an analysis for every (text, perspective), drops empty, truncated (``max_new_tokens`` reached
without an end-of-sequence) and duplicate answers, and writes the corpus described in
:mod:`distill.data.corpus`. ``load_corpus(dir)`` reads it back; the folder is also directly a
(prompt, response) SFT dataset for ``launchers/knowdist.py`` (``--data.path=DIR``).

Determinism and resumption: the job list (text ids x perspectives x samples) is fixed by the config,
so shard ``i`` always covers the same jobs, and every job has its own sampling seed (derived from
``sampling.seed``, the text id, the perspective and the sample number). A re-run after a crash or
``kill -9`` skips the shards in the manifest and produces exactly the records an uninterrupted run
would have produced, none twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from distill.config import ConfigError, VLLMSection, to_dict
from distill.fileio import atomic_write_bytes
from distill.data import corpus as C


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class InputSection:
    source: Literal["sentibench", "jsonl", "text", "datasets"] = "sentibench"  # where the texts come from
    path: str = ""  # jsonl/text file, or datasets name (source=datasets)
    text_field: str = "text"  # field holding the text (jsonl, datasets)
    id_field: str = "id"  # optional field holding a stable id (jsonl, datasets); else a hash of the text
    split: str = "train"  # split to read (sentibench, datasets)
    tasks: list[str] = field(default_factory=list)  # SentiBench tasks (empty = all)
    data_dir: str = ""  # SentiBench folder (empty = distill.data.locate resolution order)
    limit_per_task: int = 0  # SentiBench texts per task (0 = all)
    limit: int = 0  # texts in total, after de-duplication (0 = all)
    max_words: int = 200  # longer texts are cut to this many words


@dataclass
class PerspectiveSection:
    file: str = ""  # user YAML with `perspectives:` (and optionally `template:`)
    mode: Literal["add", "replace"] = "add"  # add to / override the shipped set by name, or replace it
    names: list[str] = field(default_factory=list)  # use only these perspectives (empty = all)
    per_text: int = 0  # perspectives per text, rotating over the list (0 = every perspective for every text)
    prompt_style: Literal["template", "chat", "chat_system", "builtin"] = "template"  # see perspectives.yaml


@dataclass
class TeacherSection:
    model: str = ""  # HF folder or hub name; empty = the built-in small teacher (trained here, cached)
    backend: Literal["ray", "local"] = "ray"  # Ray service or in-process teacher
    engine: Literal["hf", "vllm"] = "hf"  # hf (our decode loop over HF modules) | vllm (vLLM engines: one in this process with backend=local, `replicas` Ray actors with backend=ray)
    vllm: VLLMSection = field(default_factory=VLLMSection)  # engine=vllm: tensor parallelism, memory share, context
    replicas: int = 1  # Ray: teacher replicas
    shards: int = 1  # Ray: pipeline stages per replica (layer ranges)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    quantization: str = ""  # "" | 8bit | 4bit (bitsandbytes, CUDA)
    max_batch_tokens: int = 16384  # padded tokens per teacher batch (prompt + new tokens)
    max_batch_size: int = 64  # sequences per teacher batch
    ray_address: str = ""  # "" = join/start local Ray on loopback; "auto" = existing cluster
    max_restarts: int = 3  # Ray: restarts of a dead teacher actor (the router; each replica), then the harvest stops
    max_retries: int = 3  # Ray: re-sends of one request / batch after the actor serving it died
    workdir: str = "runs/knowdist/builtin"  # cache of the built-in teacher (shared with launchers/knowdist.py)


@dataclass
class SamplingSection:
    max_new_tokens: int = 128  # tokens per analysis, at most (reaching it = truncated, dropped)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # top-k sampling (0 = off)
    samples_per_prompt: int = 1  # analyses per (text, perspective); identical ones are dropped
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end an analysis (eos always does)
    seed: int = 0  # base of every job's sampling seed


@dataclass
class OutputSection:
    dir: str = "runs/harvest/corpus"  # corpus folder
    format: Literal["jsonl", "parquet"] = "jsonl"  # shard file format
    shard_size: int = 256  # jobs (prompts) per shard
    inflight_shards: int = 0  # shards submitted to the teacher at once (0 = 2 x replicas)
    overwrite: bool = False  # start over when the folder holds a corpus of a different config
    progress: bool = True  # tqdm progress bar


@dataclass
class HarvestConfig:
    input: InputSection = field(default_factory=InputSection)
    perspectives: PerspectiveSection = field(default_factory=PerspectiveSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def validate(self) -> None:
        if self.input.source in ("jsonl", "text", "datasets") and not self.input.path:
            raise ConfigError(f"input.source={self.input.source} needs input.path")
        if self.output.shard_size < 1:
            raise ConfigError(f"output.shard_size={self.output.shard_size} must be >= 1")
        if self.sampling.samples_per_prompt < 1:
            raise ConfigError(f"sampling.samples_per_prompt={self.sampling.samples_per_prompt} must be >= 1")
        if self.sampling.samples_per_prompt > 1 and self.sampling.temperature == 0:
            raise ConfigError("sampling.samples_per_prompt > 1 needs sampling.temperature > 0 (greedy repeats itself)")
        if self.sampling.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens={self.sampling.max_new_tokens} must be >= 1")
        if self.teacher.replicas < 1 or self.teacher.shards < 1:
            raise ConfigError(f"teacher.replicas={self.teacher.replicas}, teacher.shards={self.teacher.shards} must be >= 1")
        if self.teacher.engine not in ("hf", "vllm"):
            raise ConfigError(f"teacher.engine={self.teacher.engine!r}: hf | vllm")
        if self.teacher.engine == "vllm":
            self.teacher.vllm.validate("teacher.vllm")
            if self.teacher.quantization or self.teacher.shards != 1:
                raise ConfigError("teacher.engine=vllm takes neither teacher.quantization nor teacher.shards (our HF "
                                  "engine's); use teacher.vllm.tensor_parallel_size, or a quantized checkpoint vLLM reads")
        if self.teacher.quantization not in ("", "8bit", "4bit"):
            raise ConfigError(f"teacher.quantization={self.teacher.quantization!r} must be '', 8bit or 4bit")
        for name in ("max_restarts", "max_retries"):
            if getattr(self.teacher, name) < 0:
                raise ConfigError(f"teacher.{name}={getattr(self.teacher, name)} must be >= 0 (0 = a dead teacher "
                                  f"actor stops the harvest at once)")


# ----------------------------------------------------------------------------------------------
# Inputs


def _text_id(text: str) -> str:
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _clean(text: str, max_words: int) -> str:
    words = str(text).split()
    return " ".join(words[:max_words]) if max_words > 0 else " ".join(words)


def _input_lines(path: Path) -> list[str]:
    """The lines of a user's input file, or a one-line CorpusError naming it."""
    if not path.is_file():
        raise C.CorpusError(f"input.path={path} does not exist; check the path")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise C.CorpusError(f"{path}: not valid UTF-8 (byte offset {e.start}); re-save the file as UTF-8") from e
    except OSError as e:
        raise C.CorpusError(f"{path}: cannot read it ({e.strerror or e})") from e


def load_inputs(cfg: InputSection) -> tuple[list[tuple[str, str]], int]:
    """[(text_id, text)] in input order, de-duplicated by text; plus the number of duplicate texts."""
    raw: list[tuple[str | None, str]] = []
    if cfg.source == "sentibench":
        from distill.data.sentibench import load_texts

        texts = load_texts(split=cfg.split, tasks=cfg.tasks or None, data_dir=cfg.data_dir or None,
                           limit_per_task=cfg.limit_per_task or None)
        raw = [(None, t) for t in texts]
    elif cfg.source == "jsonl":
        path = Path(cfg.path)
        for n, line in enumerate(_input_lines(path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise C.CorpusError(f"{path}:{n}: not valid JSON ({e}); fix or remove the line") from e
            if not isinstance(obj, dict) or cfg.text_field not in obj:
                raise C.CorpusError(f"{path}:{n}: missing field '{cfg.text_field}' (set input.text_field)")
            if not isinstance(obj[cfg.text_field], str):
                raise C.CorpusError(f"{path}:{n}: field '{cfg.text_field}' must be a string")
            rid = obj.get(cfg.id_field)
            raw.append((None if rid is None else str(rid), obj[cfg.text_field]))
    elif cfg.source == "text":
        raw = [(None, line) for line in _input_lines(Path(cfg.path))]
    elif cfg.source == "datasets":
        import datasets

        ds = datasets.load_dataset(cfg.path, split=cfg.split)
        if cfg.text_field not in ds.column_names:
            raise C.CorpusError(f"dataset {cfg.path} ({cfg.split}): no column '{cfg.text_field}' (columns: "
                                f"{ds.column_names}); set input.text_field")
        ids = ds[cfg.id_field] if cfg.id_field in ds.column_names else [None] * len(ds)
        raw = [(None if i is None else str(i), t) for i, t in zip(ids, ds[cfg.text_field])]
    else:
        raise ConfigError(f"input.source={cfg.source!r} is not one of sentibench, jsonl, text, datasets")
    out, seen, dup = [], set(), 0
    for rid, text in raw:
        text = _clean(text or "", cfg.max_words)
        if not text:
            continue
        if text in seen:
            dup += 1
            continue
        seen.add(text)
        out.append((rid or _text_id(text), text))
        if cfg.limit and len(out) >= cfg.limit:
            break
    ids = [i for i, _ in out]
    if len(set(ids)) != len(ids):
        raise C.CorpusError(f"input ids (field '{cfg.id_field}' of input.path={cfg.path}) are not unique")
    return out, dup


# ----------------------------------------------------------------------------------------------
# Perspectives and prompts


def load_perspectives(cfg: PerspectiveSection) -> tuple[str, list[dict]]:
    """(template, [{name, instruction}]) from the shipped YAML, merged with the user's file."""
    import yaml

    shipped = yaml.safe_load(resources.files("distill.knowdist").joinpath("perspectives.yaml").read_text("utf-8"))
    template, persp = shipped["template"], list(shipped["perspectives"])
    if cfg.file:
        from distill.config import load_yaml

        path = Path(cfg.file)
        if not path.is_file():
            raise ConfigError(f"perspectives.file={path} does not exist or is not a file; check the path")
        try:
            user = load_yaml(path)  # invalid YAML, a key twice, not a mapping: one line naming the file
        except ConfigError as e:
            raise ConfigError(f"perspectives.file: {e}") from None
        if not isinstance(user.get("perspectives", []), list):
            raise ConfigError(f"{path}: expected a mapping with a `perspectives:` list")
        for i, p in enumerate(user.get("perspectives", [])):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("instruction"), str):
                raise ConfigError(f"{path}: perspectives[{i}] needs string fields 'name' and 'instruction'")
        template = user.get("template", template)
        if cfg.mode == "replace":
            persp = list(user.get("perspectives", []))
        else:
            by_name = {p["name"]: p for p in persp}
            for p in user.get("perspectives", []):
                by_name[p["name"]] = p
            persp = list(by_name.values())
    if "{text}" not in template:
        raise ConfigError(f"perspectives template must contain {{text}}: {template!r}")
    if cfg.prompt_style == "builtin":
        # The built-in teacher was trained on its own perspective names (distill.models.builtin.PERSPECTIVES)
        # and is prompted with the name alone: another name is a prompt it has never seen.
        from distill.models.builtin import PERSPECTIVES

        unknown = [n for n in cfg.names if n not in PERSPECTIVES]
        if unknown:
            raise ConfigError(f"perspectives.names {unknown}: the built-in teacher (prompt_style=builtin) knows only "
                              f"{list(PERSPECTIVES)}; pick among those, or harvest with your own teacher "
                              f"(teacher.model) for other perspectives")
        known = {p["name"]: p for p in persp}
        persp = [known.get(n, {"name": n, "instruction": n}) for n in cfg.names or PERSPECTIVES]
    elif cfg.names:
        known = {p["name"]: p for p in persp}
        unknown = [n for n in cfg.names if n not in known]
        if unknown:
            raise ConfigError(f"perspectives.names {unknown} are not defined; known: {list(known)} (add more with "
                              f"perspectives.file)")
        persp = [known[n] for n in cfg.names]
    if not persp:
        raise ConfigError("no perspectives to harvest")
    names = [p["name"] for p in persp]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate perspective names {names}")
    return template, persp


# prompt_style "chat_system": the perspective is the system message, the text the user message.
CHAT_SYSTEM = "You are an expert in sentiment analysis. {instruction}"
CHAT_USER = "Text: {text}"


def make_prompt(style: str, template: str, persp: dict, text: str, tokenizer=None) -> str:
    if style == "builtin":
        from distill.models.builtin import format_prompt

        return format_prompt(text, persp["name"])
    if style in ("chat", "chat_system"):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"perspectives.prompt_style={style} but the teacher's tokenizer has no chat template "
                              "(an instruct model's tokenizer_config.json carries one; a base model needs "
                              "prompt_style=template)")
        if style == "chat":
            messages = [{"role": "user", "content": template.format(instruction=persp["instruction"], text=text)}]
        else:
            messages = [{"role": "system", "content": CHAT_SYSTEM.format(instruction=persp["instruction"])},
                        {"role": "user", "content": CHAT_USER.format(text=text)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return template.format(instruction=persp["instruction"], text=text)


def job_seed(base: int, text_id: str, perspective: str, sample: int) -> int:
    h = hashlib.sha1(f"{base}|{text_id}|{perspective}|{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# The teacher


def build_teacher(cfg: TeacherSection, model: str):
    if cfg.engine == "vllm" and cfg.backend == "ray":
        from distill.teacher.vllm_ray import VLLMReplicas

        return VLLMReplicas(model, cfg.vllm, replicas=cfg.replicas, dtype=cfg.dtype,
                            ray_address=cfg.ray_address or None, max_restarts=cfg.max_restarts,
                            max_retries=cfg.max_retries)
    if cfg.engine == "vllm":
        from distill.teacher.vllm_engine import VLLMEngine

        return VLLMEngine(model, cfg.vllm, dtype=cfg.dtype, key="teacher.engine")  # every request carries its seed
    if cfg.backend == "local":
        from distill.teacher.local import LocalTeacher

        return LocalTeacher(model, shards=cfg.shards, dtype=cfg.dtype, quantization=cfg.quantization or None,
                            max_batch_tokens=cfg.max_batch_tokens, max_batch_size=cfg.max_batch_size)
    from distill.teacher.ray_service import TeacherService

    return TeacherService(model, replicas=cfg.replicas, shards=cfg.shards, dtype=cfg.dtype,
                          quantization=cfg.quantization or None, max_batch_tokens=cfg.max_batch_tokens,
                          max_batch_size=cfg.max_batch_size, ray_address=cfg.ray_address or None,
                          max_restarts=cfg.max_restarts, max_retries=cfg.max_retries)


def resolve_teacher_model(cfg: TeacherSection) -> str:
    if cfg.model:
        return cfg.model
    from distill.models.builtin import ensure_builtin_teacher

    return str(ensure_builtin_teacher(cfg.workdir))


# ----------------------------------------------------------------------------------------------
# Harvest


def _fingerprint(cfg: HarvestConfig, model: str, jobs_digest: str) -> str:
    keep = {"perspectives": to_dict(cfg.perspectives), "sampling": to_dict(cfg.sampling), "teacher": model,
            "shard_size": cfg.output.shard_size, "format": cfg.output.format, "jobs": jobs_digest}
    if cfg.teacher.engine != "hf":  # another engine samples with other random streams: not the same corpus
        keep["engine"] = cfg.teacher.engine
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _print(msg: str) -> None:
    print(f"[harvest] {msg}", flush=True)


# Above this fraction of answers cut at max_new_tokens (and dropped), the harvest warns: the corpus
# then misses most of what the teacher meant to write.
TRUNCATED_WARN_FRACTION = 0.2


def _weights_change(have: dict, want: dict) -> str:
    """What differs between two teacher-weight fingerprints, in a few words."""
    if "hub" in have or "hub" in want:
        return f"teacher {have.get('hub', 'a local folder')!r} -> {want.get('hub', 'a local folder')!r}"
    hf, wf = have.get("files", {}), want.get("files", {})
    changed = sorted(n for n in set(hf) | set(wf) if hf.get(n) != wf.get(n))
    changed += sorted(k for k in set(have) | set(want) if k != "files" and have.get(k) != want.get(k))
    return "changed: " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


def harvest(cfg: HarvestConfig, *, teacher=None, model_name: str | None = None,
            resume_command: str | None = None) -> Path:
    """Harvest (or resume) the corpus of ``cfg``; returns the corpus folder.

    ``teacher``: an already running TeacherService / LocalTeacher to use (not shut down here);
    ``model_name`` is then what records store as ``teacher``. ``resume_command``: the command line
    that reruns this harvest (the launcher's), named when a teacher fault stops it.

    Teacher faults: every restart of a teacher actor is printed as one warning line; when the
    teacher's budget is spent (``teacher.max_restarts`` / ``max_retries``) the harvest stops with
    :class:`~distill.teacher.TeacherUnavailable`, one line saying which actor died, why, what is
    kept (the finished shards, listed in the manifest) and how to resume.
    """
    from distill.fileio import writable_folder

    cfg.validate()
    t_start = time.perf_counter()
    template, persps = load_perspectives(cfg.perspectives)  # before any text is read or teacher built
    out = writable_folder(cfg.output.dir, "output.dir")
    texts, dup_texts = load_inputs(cfg.input)
    if not texts:
        raise C.CorpusError(f"no input texts (input.source={cfg.input.source} {cfg.input.path}); check the input")
    owns = teacher is None
    model = model_name or (resolve_teacher_model(cfg.teacher) if owns else str(getattr(teacher, "model", "teacher")))

    jobs = _job_list(texts, len(persps), cfg.perspectives.per_text, cfg.sampling.samples_per_prompt)
    jobs_digest = hashlib.sha256("\n".join(f"{t}|{persps[p]['name']}|{s}" for t, _, p, s in jobs).encode()).hexdigest()
    fp = _fingerprint(cfg, model, jobs_digest)
    n_shards = (len(jobs) + cfg.output.shard_size - 1) // cfg.output.shard_size
    man = _open_manifest(cfg, out, model, fp, len(jobs), n_shards)
    removed = C.clean_partial(out)
    if removed:
        _print(f"removed {len(removed)} unfinished file(s) of an interrupted run: {removed[:3]}")
    done = {int(k) for k in man["completed"]}
    todo = [i for i in range(n_shards) if i not in done]
    # Duplicate answers are checked against everything already written.
    seen = {(r["id"].split("#")[0], r["response"].strip()) for r in C.load_corpus(out)} if done else set()
    if done:
        _print(f"resuming: {len(done)}/{n_shards} shards done, {len(todo)} to go")

    run = _ShardRun(cfg, out, man, jobs, n_shards, persps, template, model, resume_command)
    if owns and todo:
        t = cfg.teacher
        if t.engine == "vllm":
            where = f"vLLM, {t.replicas if t.backend == 'ray' else 1} engine(s) on {t.backend}, " \
                    f"tensor parallel {t.vllm.tensor_parallel_size}"
        else:
            where = f"{t.backend}, {t.replicas} x {t.shards}"
        _print(f"teacher {model} ({where})")
        teacher = build_teacher(cfg.teacher, model)
    t_gen = time.perf_counter()
    try:
        counts = run.generate(teacher, todo, seen)
    finally:
        if owns and teacher is not None and todo:
            teacher.shutdown()
    wall = time.perf_counter() - t_gen
    run.finish(len(texts), dup_texts, todo, counts, wall, t_start)
    return out


def _job_list(texts: list, n_persps: int, per_text: int, samples: int) -> list[tuple]:
    """[(text_id, text, perspective index, sample)]: fixed by the config, so shard i is always the same jobs.
    ``per_text`` < the number of perspectives rotates over them (0 = every perspective for every text)."""
    per_text = per_text or n_persps
    jobs = []
    for ti, (tid, text) in enumerate(texts):
        for j in range(min(per_text, n_persps)):
            pi = (ti + j) % n_persps if per_text < n_persps else j
            for s in range(samples):
                jobs.append((tid, text, pi, s))
    return jobs


def _open_manifest(cfg: HarvestConfig, out: Path, model: str, fp: str, n_jobs: int, n_shards: int) -> dict:
    """The manifest of ``out`` if it holds this harvest (fingerprint ``fp``, the same teacher weights),
    else a new one written there; a stale corpus is refused, or cleared with ``output.overwrite``."""
    from distill.models.fingerprint import weights_fingerprint

    weights = weights_fingerprint(model)
    man = C.read_manifest(out)
    stale = None  # why the folder's corpus is not this harvest's: refused, or cleared with output.overwrite
    if man is not None and man.get("fingerprint") != fp:
        stale = (f"holds a corpus of a different config (fingerprint {man.get('fingerprint')} != {fp}); "
                 "use another output.dir or --output.overwrite=true")
    elif man is not None and man.get("teacher_weights") not in (None, weights):
        stale = (f"the corpus was harvested from other weights of teacher {model} "
                 f"({_weights_change(man['teacher_weights'], weights)}): use another output.dir, or "
                 "--output.overwrite=true to harvest it again from these weights")
    if stale:
        if not cfg.output.overwrite:
            raise C.CorpusError(f"{out / C.MANIFEST}: {stale}")
        for p in out.iterdir():
            if p.name.startswith("shard-") or p.name in (C.MANIFEST, C.SUMMARY):
                p.unlink()
        man = None
    data = _input_provenance(cfg.input)
    if man is not None:
        man.setdefault("data", data)
        if man.get("teacher_weights") is None:
            _print(f"warning: {out / C.MANIFEST} records no fingerprint of the teacher's weights (an older harvest): "
                   "it cannot show the corpus came from these weights; recorded now")
            man["teacher_weights"] = weights
            C.write_manifest(out, man)
    if man is None:
        man = {"fingerprint": fp, "teacher": model, "teacher_weights": weights, "n_jobs": n_jobs,
               "n_shards": n_shards, "shard_size": cfg.output.shard_size, "format": cfg.output.format,
               "config": to_dict(cfg), "data": data, "completed": {}}
        C.write_manifest(out, man)
    return man


def _input_provenance(section: InputSection) -> dict:
    """Which data the texts came from ("full" / "sample" SentiBench, or the input file): data_dir=""
    resolves per machine. The sample is the first records of the full data unchanged, so a corpus
    whose fingerprint matches holds the same texts; it keeps the provenance it was first harvested with."""
    if section.source == "sentibench":
        from distill.data.sentibench import data_provenance

        return data_provenance(section.data_dir or None)
    return {"source": section.source, "path": section.path}


class _ShardRun:
    """The shards of one harvest run: generated by the teacher, filtered, written one by one into the
    corpus folder with the manifest updated after each; then the summary."""

    def __init__(self, cfg: HarvestConfig, out: Path, man: dict, jobs: list[tuple], n_shards: int,
                 persps: list[dict], template: str, model: str, resume_command: str | None):
        from distill.teacher.pipeline import SamplingParams

        self.cfg, self.out, self.man, self.jobs, self.persps = cfg, out, man, jobs, persps
        self.template, self.model, self.resume_command = template, model, resume_command
        self.n_shards = n_shards
        sm = cfg.sampling
        self.sampling_d = {"max_new_tokens": sm.max_new_tokens, "temperature": sm.temperature, "top_p": sm.top_p,
                           "top_k": sm.top_k, "seed": sm.seed, "stop_token_ids": list(sm.stop_token_ids)}
        self.sp = SamplingParams(max_new_tokens=sm.max_new_tokens, temperature=sm.temperature, top_p=sm.top_p,
                                 top_k=sm.top_k, seed=sm.seed, stop_token_ids=list(sm.stop_token_ids))

    def shard_jobs(self, i: int) -> list[tuple]:
        size = self.cfg.output.shard_size
        return self.jobs[i * size:(i + 1) * size]

    def generate(self, teacher, todo: list[int], seen: set) -> dict:
        """Generate, filter and write shards ``todo`` (at most ``output.inflight_shards`` in flight);
        this run's counts. A spent teacher ends it with a one-line :class:`TeacherUnavailable`."""
        from distill.teacher.pipeline import TeacherUnavailable

        cfg, jobs = self.cfg, self.jobs
        counts = {"kept": 0, "empty": 0, "truncated": 0, "duplicate": 0, "prompt_tokens": 0, "new_tokens": 0}
        if not todo:
            return counts
        tok = getattr(teacher, "tokenizer", None)
        from distill.progress import progress

        bar = progress(len(jobs), "harvest", initial=len(jobs) - sum(min(cfg.output.shard_size, len(jobs) - i * cfg.output.shard_size) for i in todo),
                       unit="prompt", disable=not cfg.output.progress, mininterval=1.0)
        window = cfg.output.inflight_shards or 2 * max(1, cfg.teacher.replicas)
        pending: list = []

        def submit(i):
            chunk = self.shard_jobs(i)
            prompts = [make_prompt(cfg.perspectives.prompt_style, self.template, self.persps[p], text, tok)
                       for _, text, p, _ in chunk]
            seeds = [job_seed(cfg.sampling.seed, t, self.persps[p]["name"], s) for t, _, p, s in chunk]
            return i, chunk, prompts, teacher.async_generate(prompts, self.sp, seeds=seeds)

        queue = list(todo)
        faults = getattr(teacher, "faults", None)  # the Ray service's restart log (LocalTeacher: none)
        while queue or pending:
            while queue and len(pending) < window:
                pending.append(submit(queue.pop(0)))
            i, chunk, prompts, handle = pending.pop(0)
            try:
                gens = teacher.get(handle)
            except TeacherUnavailable as e:
                raise TeacherUnavailable(_stopped(e, i, self.man, self.n_shards, self.out, self.resume_command)) from e
            for line in faults() if faults is not None else ():
                _print(f"warning: {line}; the harvest goes on")
            records, c = _filter(chunk, prompts, gens, self.persps, seen, self.model, self.sampling_d,
                                 cfg.sampling.samples_per_prompt)
            C.write_shard(self.out, i, records, cfg.output.format)
            self.man["completed"][str(i)] = dict(c, file=C.shard_name(i, cfg.output.format))
            C.write_manifest(self.out, self.man)
            for k in counts:
                counts[k] += c.get(k, 0)
            bar.update(len(chunk))
        bar.close()
        return counts

    def finish(self, n_texts: int, dup_texts: int, todo: list[int], counts: dict, wall: float,
               t_start: float) -> None:
        """Write the summary (whole corpus and this run) and print it in a few lines."""
        cfg, out, man, jobs = self.cfg, self.out, self.man, self.jobs
        totals = {k: sum(v.get(k, 0) for v in man["completed"].values()) for k in
                  ("kept", "empty", "truncated", "duplicate", "prompt_tokens", "new_tokens", "jobs")}
        n_texts_run = len({j[0] for i in todo for j in self.shard_jobs(i)})
        summary = {
            "corpus": str(out), "teacher": self.model, "data": man["data"], "texts": n_texts,
            "duplicate_texts_dropped": dup_texts,
            "perspectives": [p["name"] for p in self.persps], "jobs": len(jobs), "shards": self.n_shards, **totals,
            "this_run": {"shards": len(todo), "texts": n_texts_run, **counts, "generate_s": round(wall, 3),
                         "texts_per_s": round(n_texts_run / wall, 3) if wall > 0 and todo else None,
                         "tokens_per_s": round((counts["prompt_tokens"] + counts["new_tokens"]) / wall, 1) if wall > 0 and todo else None,
                         "new_tokens_per_s": round(counts["new_tokens"] / wall, 1) if wall > 0 and todo else None},
            "wall_s": round(time.perf_counter() - t_start, 3),
        }
        frac = totals["truncated"] / max(totals["jobs"], 1)
        summary["truncated_fraction"] = round(frac, 4)
        warn = None
        if frac > TRUNCATED_WARN_FRACTION:
            warn = (f"{totals['truncated']} of {totals['jobs']} answers ({100 * frac:.0f}%) reached max_new_tokens="
                    f"{cfg.sampling.max_new_tokens} and were dropped as truncated: raise sampling.max_new_tokens "
                    f"(harvest.max_new_tokens in a KnowDist config) and harvest again into a new output.dir")
        summary["warnings"] = [warn] if warn else []
        atomic_write_bytes(out / C.SUMMARY, json.dumps(summary, indent=1).encode())
        tr = summary["this_run"]
        _print(f"{totals['kept']} records kept of {len(jobs)} prompts ({totals['empty']} empty, {totals['truncated']} "
               f"truncated, {totals['duplicate']} duplicate dropped; {dup_texts} duplicate input texts) -> {out}")
        if warn:
            _print(f"warning: {warn}")
        if todo:
            _print(f"throughput: {tr['texts_per_s']} texts/s, {tr['tokens_per_s']} tokens/s "
                   f"({tr['new_tokens_per_s']} generated tokens/s) over {wall:.1f}s")
        from distill.data.sentibench import sample_note

        if sample_note(summary["data"]):
            _print(sample_note(summary["data"]))


def _stopped(e: Exception, shard: int, man: dict, n_shards: int, out: Path, resume_command: str | None) -> str:
    """The one line a teacher fault ends the harvest with: what died, what is kept, how to resume."""
    kept = sum(v.get("kept", 0) for v in man["completed"].values())
    if resume_command:
        how = f"resume with: {resume_command}"
        if os.environ.get("SLURM_JOB_ID"):
            how += " (or resubmit the SLURM job with the same output.dir)"
    else:
        how = "rerun the harvest with the same config and output.dir to resume"
    return (f"{e} (while waiting for shard {shard}); the harvest stopped: {len(man['completed'])}/{n_shards} "
            f"shards ({kept} records) are written in {out} and kept (listed in {C.MANIFEST}); {how}")


def _filter(chunk, prompts, gens, persps, seen, model, sampling_d, S):
    c = {"kept": 0, "empty": 0, "truncated": 0, "duplicate": 0, "prompt_tokens": 0, "new_tokens": 0, "jobs": len(chunk)}
    records = []
    if len(gens) != len(chunk):
        raise RuntimeError(f"teacher returned {len(gens)} generations for {len(chunk)} prompts")
    for (tid, text, p, s), prompt, g in zip(chunk, prompts, gens):
        c["prompt_tokens"] += g.prompt_tokens
        c["new_tokens"] += len(g.token_ids)
        resp = g.text.rstrip()  # keep the teacher's leading space: prompt + response is one text
        name = persps[p]["name"]
        if not resp.strip():
            c["empty"] += 1
            continue
        if g.finish_reason != "stop":
            c["truncated"] += 1
            continue
        key = (f"{tid}|{name}", resp.strip())
        if key in seen:
            c["duplicate"] += 1
            continue
        seen.add(key)
        rid = f"{tid}|{name}" + (f"#{s}" if S > 1 else "")
        records.append({"id": rid, "text": text, "perspective": name, "prompt": prompt, "response": resp,
                        "teacher": model, "sampling": dict(sampling_d, sample=s)})
        c["kept"] += 1
    return records, c


def load_corpus(folder: str | os.PathLike) -> list[dict]:
    """Records of a harvested corpus (see :mod:`distill.data.corpus`)."""
    return C.load_corpus(folder)


def harvest_builtin(teacher_path: str, workdir: str | os.PathLike, h) -> Path:
    """The corpus ``launchers/knowdist.py`` builds by default (``h``: :class:`distill.knowdist.stage.HarvestSection`).

    SentiBench train texts (``h.texts_per_task`` per task), the built-in teacher's prompt format,
    one perspective per text rotating over ``h.perspectives``, the in-process teacher (no Ray inside
    a DeepSpeed job). Cached: the folder is keyed by teacher and settings and resumes if cut short.
    """
    d = dataclasses.asdict(h) if dataclasses.is_dataclass(h) else dict(h)
    key = hashlib.sha256(json.dumps({"teacher": str(teacher_path), "h": d}, sort_keys=True).encode()).hexdigest()[:12]
    cfg = HarvestConfig(
        input=InputSection(source="sentibench", limit_per_task=int(d["texts_per_task"]), max_words=60),
        perspectives=PerspectiveSection(names=list(d["perspectives"]), per_text=1, prompt_style="builtin"),
        teacher=TeacherSection(model=str(teacher_path), backend="local",
                               max_batch_size=int(d.get("batch_size", 32))),
        sampling=SamplingSection(max_new_tokens=int(d["max_new_tokens"]), temperature=float(d.get("temperature", 0.0)),
                                 seed=int(d.get("seed", 0))),
        output=OutputSection(dir=str(Path(workdir) / f"corpus-{key}"), shard_size=64),
    )
    return harvest(cfg)
