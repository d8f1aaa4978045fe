"""Diversified few-shot prompts for ICLDist, built from labelled TRAIN data only.

For every training example the builder draws, from a generator seeded by (seed, task, index):

* a format: the evaluation's own ``Sentence: ... / Label: ...`` layout (``"eval"``, rendered by the
  SentiBench evaluator's prompt code so it is byte-identical to what the student is scored on), or
  one of a few other layouts (``"qa"``, ``"review"``, ``"arrow"``);
* an instruction: the task's evaluation instruction for ``"eval"``, otherwise one of several
  phrasings of the task, with the label words listed in a shuffled order;
* a number of demonstrations, uniform in ``[min_shots, max_shots]`` (0..8 by default), drawn from the
  same task's train split, never the example itself; demonstrations are dropped from the front
  while the prompt is longer than ``max_prompt_chars``.

The answer of a classification prompt is ``" " + label word`` (the evaluation's lower-cased label
words, whose first sub-tokens form its verbalizer); of a fine-grained prompt, the gold tuple list in
the evaluation's format (kept for reference: the student learns the teacher's generated answer).

Held-out tasks are excluded entirely (no prompt, no demonstration). Test splits are never read:
:func:`build_prompt_set` reads ``split="train"`` through :mod:`distill.icldist.tasks` only.
The set is deterministic for a seed; :func:`prompt_set_hash` fingerprints it for the teacher cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from distill.icldist.tasks import TaskData, clip_text

FORMATS = ("eval", "qa", "review", "arrow")

# Layouts other than the evaluation's. {i} = instruction, {x} = text, {y} = answer (leading space
# included), {t} = stance target. Every layout ends its query with a cue whose answer starts with a
# space, like the evaluation's "Label:", so the label word's first sub-token is the verbalizer's.
_LAYOUTS = {
    "qa": {"demo": "Text: {x}\nAnswer:{y}", "query": "Text: {x}\nAnswer:", "sep": "\n\n", "head": "{i}\n\n"},
    "review": {"demo": 'Input: "{x}"\nOutput:{y}', "query": 'Input: "{x}"\nOutput:', "sep": "\n", "head": "{i}\n"},
    "arrow": {"demo": "{x} =>{y}", "query": "{x} =>", "sep": "\n", "head": "### {i}\n"},
}

# Instruction phrasings per task family; {labels} = the label words in a shuffled order, joined.
INSTRUCTIONS = {
    "polarity": (
        "Classify the sentiment of the text. Answer with one of: {labels}.",
        "What is the overall sentiment expressed below? Choose from {labels}.",
        "Read the text and decide whether its sentiment is {labels}.",
        "Label the polarity of each text as {labels}.",
        "Sentiment analysis. Possible labels: {labels}.",
    ),
    "irony": (
        "Decide whether the tweet is ironic. Labels: {labels}.",
        "Is the following text ironic or not? Answer {labels}.",
        "Classify each tweet as {labels} depending on whether it uses irony.",
    ),
    "emotion": (
        "Which emotion does the tweet express? Choose one of {labels}.",
        "Classify the emotion of the text as {labels}.",
        "Identify the dominant emotion ({labels}).",
    ),
    "stance": (
        "What is the author's stance toward {target}? Answer {labels}.",
        "Classify the stance of the tweet on {target} as {labels}.",
        "Does the text speak {labels} {target}?",
    ),
    "intimacy": (
        "How intimate is the tweet? Answer with {labels}.",
        "Rate the intimacy of the text: {labels}.",
        "Classify the level of personal intimacy as {labels}.",
    ),
    "generic": (
        "Classify the text. Answer with one of: {labels}.",
        "Choose the right label for the text from {labels}.",
        "Assign one label ({labels}) to each text.",
    ),
    "atsa": (
        "List every aspect term in the sentence with its sentiment polarity as a Python list of (aspect, polarity) tuples.",
        "Extract the aspect terms and the sentiment toward each; answer as a list of (aspect, polarity) tuples.",
    ),
    "acsa": (
        "List the aspect categories discussed in the sentence with their polarity as a Python list of (category, polarity) tuples.",
        "Which aspect categories are mentioned, and with what sentiment? Answer as a list of (category, polarity) tuples.",
    ),
    "asqp": (
        "Extract all sentiment quadruples (category, aspect, opinion, sentiment) as a Python list of tuples.",
        "For the sentence, list every (category, aspect, opinion, sentiment) quadruple.",
    ),
    "opener": (
        "Extract every opinion as (holder, target, expression, polarity) tuples in a Python list; use NULL for missing parts.",
        "List the structured opinions of the text as (holder, target, expression, polarity) tuples.",
    ),
}


@dataclass
class PromptConfig:
    tasks: list[str] = field(default_factory=lambda: ["all"])  # SentiBench tasks ("all" or names like sc/sst2)
    held_out: list[str] = field(default_factory=lambda: ["multifaced/irony18", "absa/acsa_rest16"])  # excluded entirely
    fine_grained: bool = True  # include ATSA/ACSA/ASQP/OpeNER (token-level KD; needs one vocabulary)
    per_task: int = 24  # prompts per task (0 = every train example; the tiny default keeps the set small)
    min_shots: int = 0  # fewest demonstrations per prompt
    max_shots: int = 8  # most demonstrations per prompt
    formats: list[str] = field(default_factory=lambda: list(FORMATS))  # layouts to draw from
    max_prompt_chars: int = 2000  # demonstrations are dropped (front first) beyond this many characters
    max_text_chars: int = 400  # one text (query or demonstration) is cut to this many characters
    seed: int = 1234  # one prompt set per seed
    data_dir: str = ""  # SentiBench root ("" = the usual resolution order, see distill.data.locate)
    extra: list[dict] = field(default_factory=list)  # user datasets, see docs/icldist.md ("Your own data")

    def validate(self, where: str = "prompts") -> None:
        from distill.config import ConfigError

        if not 0 <= self.min_shots <= self.max_shots:
            raise ConfigError(f"{where}: need 0 <= min_shots ({self.min_shots}) <= max_shots ({self.max_shots})")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"{where}.formats: {bad or '[]'} not in {list(FORMATS)}")
        if self.per_task < 0:
            raise ConfigError(f"{where}.per_task must be >= 0, got {self.per_task}")
        self.validate_tasks(where)

    def validate_tasks(self, where: str = "prompts") -> None:
        """Task names, held-out names, the data folder and every ``extra`` entry, before any data is read."""
        from distill.config import ConfigError, check_sentibench_tasks
        from distill.data.sentibench import TASKS
        from distill.icldist.tasks import check_extra_spec, extra_name

        if self.tasks:  # none: only the prompts.extra datasets
            check_sentibench_tasks(",".join(self.tasks), f"{where}.tasks")
        if self.data_dir and not Path(self.data_dir).is_dir():
            raise ConfigError(f"{where}.data_dir: {self.data_dir} does not exist or is not a folder; give the SentiBench "
                              f"folder, or leave it empty for the usual places (docs/sentibench.md)")
        for i, spec in enumerate(self.extra):
            check_extra_spec(spec, i)
        extra = [extra_name(spec, i) for i, spec in enumerate(self.extra)]
        twice = sorted({n for n in extra if extra.count(n) > 1} | (set(extra) & set(TASKS)))
        if twice:
            raise ConfigError(f"{where}.extra: task name(s) {twice} are used twice (or are SentiBench task names); "
                              f"give each dataset its own name")
        unknown = [t for t in self.held_out if t not in TASKS and t not in extra]
        if unknown:
            raise ConfigError(f"{where}.held_out: {unknown} are not tasks; known: the SentiBench tasks "
                              f"{', '.join(TASKS)}" + (f" and the prompts.extra names {', '.join(extra)}" if extra else ""))


@dataclass
class Prompt:
    """One training prompt. ``answer`` starts with a space and follows the prompt directly."""

    id: str  # "<task>/<train index>"
    task: str
    kind: str  # "classification" | "fine-grained"
    format: str
    n_shots: int
    prompt: str
    answer: str  # gold answer (" positive"; " [('food', 'positive')]")
    label_words: list[str]  # classification: the task's label words in the evaluation's order
    gold: int  # classification: index of the gold label in label_words; -1 otherwise

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(seed: int, *key) -> random.Random:
    digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _join_labels(words: Sequence[str], rng: random.Random) -> str:
    words = list(words)
    rng.shuffle(words)
    if len(words) == 2:
        return f"{words[0]} or {words[1]}"
    return ", ".join(words[:-1]) + f" or {words[-1]}"


def _render(task: TaskData, fmt: str, instruction: str, demos: list, query, max_chars: int, max_text: int) -> tuple[str, int]:
    """Prompt text and the number of demonstrations kept under ``max_chars``."""
    demos = list(demos)
    while True:
        if fmt == "eval":
            text = task.render_eval(demos, query, max_text)
        else:
            lay = _LAYOUTS[fmt]
            parts = [lay["demo"].format(x=clip_text(d.text, max_text), y=d.answer) for d in demos]
            parts.append(lay["query"].format(x=clip_text(query.text, max_text)))
            text = lay["head"].format(i=instruction) + lay["sep"].join(parts)
        if len(text) <= max_chars or not demos:
            return text, len(demos)
        demos = demos[1:]


def build_task_prompts(task: TaskData, cfg: PromptConfig) -> list[Prompt]:
    """Prompts for one task's train examples (deterministic for ``cfg.seed``)."""
    n = len(task.examples)
    order = list(range(n))
    if cfg.per_task and cfg.per_task < n:
        order = sorted(_rng(cfg.seed, task.name, "subset").sample(order, cfg.per_task))
    phrasings = INSTRUCTIONS.get(task.family, INSTRUCTIONS["generic"])
    if task.instructions:
        phrasings = tuple(task.instructions)
    out = []
    for i in order:
        rng = _rng(cfg.seed, task.name, i)
        ex = task.examples[i]
        fmt = rng.choice(cfg.formats)
        if fmt == "eval" and not task.has_eval_format:
            fmt = rng.choice([f for f in cfg.formats if f != "eval"] or list(FORMATS[1:]))
        shots = rng.randint(cfg.min_shots, min(cfg.max_shots, n - 1))
        pool = [j for j in rng.sample(range(n), min(n, shots + 1)) if j != i][:shots]
        demos = [task.examples[j] for j in pool]
        words = task.label_words
        instruction = rng.choice(phrasings).format(
            labels=_join_labels(words, rng) if words else "", target=ex.extra.get("target", "the target")
        )
        text, kept = _render(task, fmt, instruction, demos, ex, cfg.max_prompt_chars, cfg.max_text_chars)
        gold = words.index(ex.label) if task.kind == "classification" else -1
        out.append(
            Prompt(
                id=f"{task.name}/{i}", task=task.name, kind=task.kind, format=fmt, n_shots=kept,
                prompt=text, answer=ex.eval_answer if fmt == "eval" else ex.answer, label_words=list(words), gold=gold,
            )
        )
    return out


def build_prompt_set(cfg: PromptConfig) -> list[Prompt]:
    """The whole ICLDist prompt set: SentiBench train splits (minus held-out tasks) + user datasets."""
    from distill.icldist.tasks import load_train_tasks

    tasks = load_train_tasks(cfg)
    prompts: list[Prompt] = []
    for task in tasks:
        prompts += build_task_prompts(task, cfg)
    if not prompts:
        from distill.config import ConfigError

        raise ConfigError(
            f"ICLDist prompt set is empty: tasks={cfg.tasks}, held_out={cfg.held_out}, "
            f"fine_grained={cfg.fine_grained}, extra={len(cfg.extra)} dataset(s)"
        )
    return prompts


def prompt_set_hash(prompts: Sequence[Prompt]) -> str:
    """sha256 over every prompt's id, text and answer, in order (the teacher cache's key)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.prompt, p.answer, p.label_words], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def summarize(prompts: Sequence[Prompt]) -> dict:
    """Counts per task, format and number of shots (logged and written to prompts_summary.json)."""
    from collections import Counter

    return {
        "n": len(prompts),
        "tasks": dict(Counter(p.task for p in prompts)),
        "formats": dict(Counter(p.format for p in prompts)),
        "shots": dict(sorted(Counter(p.n_shots for p in prompts).items())),
    }
