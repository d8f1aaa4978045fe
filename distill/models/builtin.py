"""The built-in small teacher and student: trained here, cached, ordinary Hugging Face folders.

``ensure_builtin_teacher(workdir)`` returns an HF folder (``model.safetensors`` + tokenizer) holding
a tiny Llama ("teacher" size of :mod:`distill.models.tiny`) that was briefly trained on SentiBench
train splits to write short sentiment analyses for perspective prompts::

    Text: <the text>
    Perspective: <perspective name or instruction>
    Analysis: <response></s>

The responses are built from the gold labels (polarity, aspects, emotion, irony, stance, intimacy,
opinion holders), so the teacher writes e.g. ``" The overall sentiment is positive."`` after
``Perspective: overall polarity``. :data:`PERSPECTIVES` lists the perspective names it was trained
on; :func:`format_prompt` builds the prompt. The KnowDist harvester prompts it with these.

Everything is cached under ``workdir`` in a folder named by a hash of the recipe (data source,
sizes, steps, seed, code version), so a second call returns at once. The tokenizer is trained on
SentiBench text (``distill.data.locate.sentibench_dir()``) or, when the data is not found, on the
small sample shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the recipe's code changes in a way that changes the trained weights.
RECIPE_VERSION = 2

PROMPT_TEMPLATE = "Text: {text}\nPerspective: {perspective}\nAnalysis:"

# Perspective name -> what the teacher was trained to write for it (documentation; the responses
# come from the gold labels of the named SentiBench tasks).
PERSPECTIVES = {
    "overall polarity": "the overall sentiment (sc/*)",
    "aspects": "aspect terms and their polarity (absa/atsa_rest16)",
    "opinions": "aspect, category, opinion words and polarity (absa/asqp_rest16)",
    "emotion": "the main emotion (multifaced/tweeteval)",
    "irony": "whether the text is ironic (multifaced/irony18)",
    "stance": "the writer's stance toward a target (multifaced/pstance)",
    "intimacy": "how intimate the text is (multifaced/intimacy)",
    "opinion holder": "who holds which opinion about what (absa/opener)",
}


def format_prompt(text: str, perspective: str) -> str:
    """The built-in teacher's prompt for ``text`` seen from ``perspective``."""
    return PROMPT_TEMPLATE.format(text=" ".join(text.split()), perspective=perspective)


@dataclass(frozen=True)
class BuiltinRecipe:
    vocab_size: int = 4096  # tokenizer vocabulary (tokens)
    teacher_size: str = "teacher"  # distill.models.tiny.SIZES key
    student_size: str = "student"  # distill.models.tiny.SIZES key
    per_task: int = 300  # training pairs per SentiBench task (records)
    max_text_tokens: int = 40  # the text is cut to this many tokens in teacher training prompts
    steps: int = 90  # teacher optimizer steps
    batch_size: int = 32  # sequences per teacher step
    lr: float = 3e-3  # AdamW peak learning rate
    warmup: int = 10  # linear warmup steps
    seed: int = 0  # weights, data order
    version: int = RECIPE_VERSION  # code version of this recipe


# ----------------------------------------------------------------------------------------------
# Data: SentiBench records -> (prompt, response) pairs


def _read_json(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig") as fh:
        return json.load(fh)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def perspective_response(task: str, r: dict) -> tuple[str, str] | None:
    """(perspective, response) from one SentiBench training record, or None when unusable."""
    label = str(r.get("label", "")).strip().lower()
    if task.startswith("sc/"):
        return "overall polarity", f" The overall sentiment is {label}."
    if task == "multifaced/tweeteval":
        return "emotion", f" The main emotion is {label}."
    if task == "multifaced/irony18":
        return "irony", " The text is ironic." if label == "irony" else " The text is not ironic (non-irony)."
    if task == "multifaced/pstance":
        target = r.get("target", "the target")
        return "stance", f" The writer is {label} {target}."
    if task == "multifaced/intimacy":
        return "intimacy", f" The text is {label}."
    if task == "absa/atsa_rest16":
        asp = r.get("aspects") or []
        if not asp:
            return "aspects", " No aspect is mentioned."
        parts = [f"{a['target']} is {a['polarity']}" for a in asp if a.get("target") and a["target"] != "NULL"]
        if not parts:
            parts = [f"{a['category'].lower().replace('#', ' ')} is {a['polarity']}" for a in asp]
        return "aspects", " " + _cap("; ".join(parts)) + "."
    if task == "absa/asqp_rest16":
        q = r.get("quards") or []
        if not q:
            return None
        parts = [f"{x['aspect']} ({x['category']}) is {x['sentiment']}: {x['opinion']}" for x in q]
        return "opinions", " " + _cap("; ".join(parts)) + "."
    if task == "absa/opener":
        ops = r.get("opinions") or []
        if not ops:
            return "opinion holder", " No opinion is expressed."
        parts = []
        for o in ops:
            src = " ".join(o.get("Source", [[]])[0]) or "the writer"
            tgt = " ".join(o.get("Target", [[]])[0]) or "something"
            exp = " ".join(o.get("Polar_expression", [[]])[0])
            parts.append(f"{src} finds {tgt} {o.get('Polarity', '').lower()} ({exp})")
        return "opinion holder", " " + _cap("; ".join(parts)) + "."
    return None


_TASKS = (
    "sc/sst2", "sc/imdb", "sc/yelp2", "sc/twitter", "multifaced/irony18", "multifaced/tweeteval",
    "multifaced/pstance", "multifaced/intimacy", "absa/atsa_rest16", "absa/asqp_rest16", "absa/opener",
)


def records_by_task(data_dir: str | os.PathLike | None = None) -> tuple[dict[str, list[dict]], str]:
    """{task: raw train records} and a description of the source (for the recipe hash).

    Reads SentiBench through :mod:`distill.data.sentibench` (the data folder, or the package sample
    when the data is not found).
    """
    from distill.data import sentibench as sb

    out = {}
    for task in _TASKS:
        path = sb.task_file(task, "train", data_dir)
        if path.is_file():
            out[task] = sb.read_raw(path)
    source = sb.data_source(data_dir)
    if not out:
        raise FileNotFoundError(
            f"no SentiBench train split found under {source}: set $SENTIBENCH_DIR (or data_dir) to the SentiBench folder"
        )
    return out, f"sentibench:{source}"


def builtin_pairs(records: dict[str, list[dict]], per_task: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Balanced (prompt, response, perspective) pairs from the train records, ``per_task`` per task."""
    rng = random.Random(seed)
    pairs = []
    for task in sorted(records):
        recs = list(records[task])
        rng.shuffle(recs)
        n = 0
        for r in recs:
            text = r.get("sentence") or r.get("text")
            got = perspective_response(task, r)
            if not text or got is None:
                continue
            perspective, response = got
            pairs.append((format_prompt(text, perspective), response, perspective))
            n += 1
            if n >= per_task:
                break
    rng.shuffle(pairs)
    return pairs


def _all_texts(records: dict[str, list[dict]]) -> list[str]:
    return [r.get("sentence") or r.get("text") or "" for task in sorted(records) for r in records[task]]


# ----------------------------------------------------------------------------------------------
# Caching helpers


def _recipe_key(recipe: BuiltinRecipe, source: str, kind: str) -> str:
    blob = json.dumps({"recipe": asdict(recipe), "source": source, "kind": kind}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _done(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "BUILTIN_DONE").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Atomic publish of a finished folder (a crash never leaves a half-written cache entry)."""
    (tmp / "BUILTIN_DONE").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class FileLock:
    """A simple exclusive lock so that several ranks of one job build the cache once."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


# How long the teacher's training took on the project's 2-core CPU machine (README quick start).
TEACHER_TIME_NOTE = "about 30 s on a 2-core CPU, less on a GPU"


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[builtin] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Public API


def ensure_builtin_tokenizer(workdir: str | os.PathLike, recipe: BuiltinRecipe = BuiltinRecipe(), *,
                             data_dir=None, verbose: bool = True) -> Path:
    """Tokenizer folder trained on SentiBench text (cached)."""
    workdir = Path(workdir)
    records, source = records_by_task(data_dir)
    key = _recipe_key(BuiltinRecipe(vocab_size=recipe.vocab_size, version=recipe.version), source, "tokenizer")
    final = workdir / f"tokenizer-{key}"
    with FileLock(workdir / ".builtin.lock"):
        if (final / "BUILTIN_DONE").is_file():
            return final
        from distill.models.tiny import train_tokenizer

        t0 = time.time()
        texts = _all_texts(records)
        tok = train_tokenizer(texts, vocab_size=recipe.vocab_size)
        tmp = workdir / f".tmp-tokenizer-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{source}\n{len(texts)} texts\n")
        _publish(tmp, final)
        _log(f"tokenizer: {len(tok)} tokens from {len(texts)} texts ({source}) in {time.time() - t0:.1f}s -> {final}", verbose)
        return final


def ensure_builtin_teacher(workdir: str | os.PathLike, recipe: BuiltinRecipe = BuiltinRecipe(), *,
                           data_dir=None, verbose: bool = True) -> Path:
    """HF folder of the built-in small teacher (trained once, then cached under ``workdir``)."""
    workdir = Path(workdir)
    records, source = records_by_task(data_dir)
    tok_dir = ensure_builtin_tokenizer(workdir, recipe, data_dir=data_dir, verbose=verbose)
    key = _recipe_key(recipe, source, "teacher")
    final = workdir / f"teacher-{key}"
    with FileLock(workdir / ".builtin.lock"):
        if _done(final):
            _log(f"teacher: cached {final}", verbose)
            return final
        _log(f"teacher: first run, training the built-in teacher once ({recipe.steps} steps; {TEACHER_TIME_NOTE}); "
             f"later runs with this run folder or model.builtin_dir reuse it", verbose)
        t0 = time.time()
        model, tok, stats = _train_teacher(tok_dir, records, recipe, verbose)
        tmp = workdir / f".tmp-teacher-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        stats.update(recipe=asdict(recipe), source=source, seconds=round(time.time() - t0, 1),
                     prompt_template=PROMPT_TEMPLATE, perspectives=PERSPECTIVES)
        (tmp / "builtin_recipe.json").write_text(json.dumps(stats, indent=2))
        _publish(tmp, final)
        _log(f"teacher: trained in {time.time() - t0:.1f}s (loss {stats['first_loss']:.2f} -> {stats['last_loss']:.2f}) -> {final}", verbose)
        return final


def ensure_builtin_student(workdir: str | os.PathLike, recipe: BuiltinRecipe = BuiltinRecipe(), *,
                           data_dir=None, seed: int | None = None, verbose: bool = True) -> Path:
    """HF folder of the randomly initialised smaller student, sharing the teacher's tokenizer."""
    workdir = Path(workdir)
    _, source = records_by_task(data_dir)
    tok_dir = ensure_builtin_tokenizer(workdir, recipe, data_dir=data_dir, verbose=verbose)
    seed = recipe.seed + 1 if seed is None else seed
    key = _recipe_key(recipe, source, f"student-seed{seed}")
    final = workdir / f"student-init-{key}"
    with FileLock(workdir / ".builtin.lock"):
        if _done(final):
            return final
        from transformers import AutoTokenizer

        from distill.models.tiny import build_tiny_causal_lm

        tok = AutoTokenizer.from_pretrained(tok_dir)
        model = build_tiny_causal_lm(len(tok), recipe.student_size, seed=seed)
        tmp = workdir / f".tmp-student-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _publish(tmp, final)
        _log(f"student init: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params -> {final}", verbose)
        return final


def _train_teacher(tok_dir: Path, records, recipe: BuiltinRecipe, verbose: bool):
    import math

    import torch
    from transformers import AutoTokenizer

    from distill.models.tiny import build_tiny_causal_lm

    tok = AutoTokenizer.from_pretrained(tok_dir)
    pairs = builtin_pairs(records, recipe.per_task, recipe.seed)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seqs = []
    for prompt, response, _ in pairs:
        # Cut the text (not the template) so every prompt keeps its perspective line.
        text_part, rest = prompt.split("\nPerspective:", 1)
        t_ids = tok(text_part, add_special_tokens=False)["input_ids"][: recipe.max_text_tokens + 2]
        p_ids = t_ids + tok("\nPerspective:" + rest, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"][:48] + [eos]
        seqs.append((p_ids, r_ids))

    model = build_tiny_causal_lm(len(tok), recipe.teacher_size, seed=recipe.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))))
    g = torch.Generator().manual_seed(recipe.seed)
    losses = []
    from distill.progress import progress

    bar = progress(recipe.steps, "builtin teacher", unit="step", disable=not verbose, mininterval=2)
    for step in range(recipe.steps):
        idx = torch.randint(len(seqs), (recipe.batch_size,), generator=g).tolist()
        batch = [seqs[i] for i in idx]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (p, r) in enumerate(batch):
            s = p + r
            ids[b, : len(s)] = torch.tensor(s)
            att[b, : len(s)] = 1
            labels[b, len(p): len(s)] = torch.tensor(r)
        out = model(input_ids=ids, attention_mask=att, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    k = max(1, len(losses) // 10)
    stats = {"first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k, "pairs": len(pairs)}
    return model, tok, stats


def generate(model_dir: str | os.PathLike, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy completions of ``prompts`` by the model in ``model_dir`` (a quick look at the teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
