"""Run a trained student (any causal LM folder) on new text with the SentiBench prompt of a task.

```bash
python -m distill.predict --model runs/knowdist/export --task sc/sst2 --text "A gem." --text "Dull."
python -m distill.predict --model runs/knowdist/export --task absa/asqp_rest16 --input in.jsonl --output preds.jsonl
distill-predict ...   # the console script, same options
```

The prompt is the evaluation's (distill/eval/protocol.py): the task's instruction and ``--shots``
demonstrations (default 4, ``--shots 0`` for zero-shot) drawn from its train split with ``--seed``
(default 42). The i-th input text gets exactly the demonstrations the i-th test example gets in a
SentiBench run with that seed, so a file's predictions are reproducible.

Classification tasks: one ``generate`` step as in the evaluation; ``label`` is the argmax over the
verbalizer (first sub-token of each label word) and ``probs`` the softmax of those scores,
renormalised over the task's label words. Fine-grained tasks: greedy generation, ``answer`` is the
text the evaluation reads (the first line after the test's ``Label:``), ``tuples`` what its parser
(distill/eval/parse.py) makes of it.

Input JSONL: one object per line with ``text`` (and ``id``, kept; ``target`` for P-Stance).
Output: one JSON object per text, in input order, on ``--output`` or stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from distill.errors import UserError, run_cli


class PredictError(UserError, ValueError):
    """A bad flag, task, model folder or input line of distill.predict."""


def _records(task: str, texts: Sequence[str], targets: Sequence[str | None]):
    from distill.data.sentibench import FINE_GRAINED, LabelRecord, TupleRecord

    if task in FINE_GRAINED:
        return [TupleRecord(index=i, text=t, tuples=()) for i, t in enumerate(texts)]
    return [LabelRecord(index=i, text=t, label="", target=g) for i, (t, g) in enumerate(zip(texts, targets))]


def predict(model, tokenizer, task: str, texts: Sequence[str], *, shots: int = 4, seed: int = 42,
            targets: Sequence[str | None] | None = None, batch_size: int = 8, data_dir=None,
            max_new_tokens: int | None = None) -> list[dict]:
    """One result dict per text (see the module docstring); ``model`` is put in eval mode."""
    import torch

    from distill.data.batching import plan_batches
    from distill.data.sentibench import FINE_GRAINED, TASKS, load_task
    from distill.eval.parse import INVALID, PARSERS
    from distill.eval.protocol import LABEL_WORDS, MAX_NEW_TOKENS, build_prompts
    from distill.eval.runner import Runner, left_pad, verbalizer_ids

    if task not in TASKS:
        raise PredictError(f"unknown task {task!r}; one of: {', '.join(TASKS)}")
    if shots < 0:
        raise PredictError(f"--shots must be >= 0, got {shots}")
    _check_max_new_tokens(max_new_tokens)
    targets = list(targets) if targets is not None else [None] * len(texts)
    if task == "multifaced/pstance":
        missing = [i for i, g in enumerate(targets) if not g]
        if missing:
            raise PredictError(f"multifaced/pstance needs a stance target (--target, or a 'target' field); "
                               f"text {missing[0]} has none")
    records = _records(task, texts, targets)
    pool = load_task(task, "train", data_dir)
    if shots > len(pool):
        raise PredictError(f"--shots {shots}: the {task} train split has only {len(pool)} records")
    prompts, _ = build_prompts(task, records, pool, shots, seed)
    runner = Runner(model, tokenizer, batch_size=batch_size,
                    max_new_tokens=MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
    model.eval()
    encoded = runner.tokenize(prompts)
    out: list[dict] = []
    if task in FINE_GRAINED:
        answers = runner.generate(encoded, shots)
        for r, ans in zip(records, answers):
            parsed = PARSERS[task](ans if ans is not None else "", r.text)
            tuples = [list(t) for t in parsed.tuples if t is not INVALID]
            out.append({"answer": ans, "tuples": tuples, "parse_failed": bool(parsed.failed or ans is None),
                        "invalid_tuples": parsed.invalid})
        return out

    words = [w.strip() for w in LABEL_WORDS[task]]
    ids = verbalizer_ids(tokenizer, task)
    cols = torch.as_tensor(ids, dtype=torch.long, device=runner.device)
    probs: dict[int, list[float]] = {}
    with torch.inference_mode():
        for b in plan_batches([len(e) for e in encoded], batch_size, None):
            inp, mask = left_pad([encoded[i] for i in b], runner.pad_id, runner.device)
            # One generate() step as the evaluation (its scores pass the generation-config processors).
            gen = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                 num_beams=1, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=runner.pad_id)
            p = gen.scores[0].index_select(-1, cols).float().softmax(-1).cpu().tolist()
            probs.update(zip(b, p))
    for i in range(len(records)):
        p = probs[i]
        best = max(range(len(words)), key=lambda k: (p[k], -k))  # ties to the first label, as the argmax
        out.append({"label": words[best], "probs": dict(zip(words, p))})
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PredictError(f"--input {p}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PredictError(f"--input {p}: not valid UTF-8 (byte offset {e.start}); re-save it as UTF-8") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise PredictError(f"{p}:{n}: expected an object with a string field 'text'")
        if "target" in obj and obj["target"] is not None and not isinstance(obj["target"], str):
            raise PredictError(f"{p}:{n}: field 'target' must be a string")
        rows.append(obj)
    if not rows:
        raise PredictError(f"--input {p}: no lines with a 'text'")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distill-predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="folder of a causal LM (e.g. a trainer export)")
    ap.add_argument("--task", required=True, help="SentiBench task, e.g. sc/sst2 or absa/opener ('sst2' works too)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--input", help="JSONL file, one {'text': ..., 'id': ...} per line")
    ap.add_argument("--output", help="JSONL file of predictions (default: stdout)")
    ap.add_argument("--target", help="P-Stance: the stance target of every --text")
    ap.add_argument("--shots", type=int, default=4, help="demonstrations per prompt (0 = zero-shot)")
    ap.add_argument("--seed", type=int, default=42, help="demonstration seed")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per model call")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="fine-grained generation budget (default 150)")
    ap.add_argument("--data-dir", default=None, help="SentiBench folder for the demonstrations (as sentibench run)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda:N")
    return ap


def resolve_task(name: str) -> str:
    from distill.data.sentibench import TASKS

    if name in TASKS:
        return name
    short = [t for t in TASKS if t.split("/", 1)[1] == name]
    if len(short) == 1:
        return short[0]
    raise PredictError(f"unknown task {name!r}; one of: {', '.join(TASKS)}")


def _check_max_new_tokens(n: int | None) -> None:
    from distill.eval.protocol import MAX_NEW_TOKENS

    if n is not None and n < 1:
        raise PredictError(f"--max-new-tokens must be >= 1 (omit it for the evaluation's {MAX_NEW_TOKENS}), got {n}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    task = resolve_task(args.task)
    if args.shots < 0:
        raise PredictError(f"--shots must be >= 0, got {args.shots}")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_max_new_tokens(args.max_new_tokens)  # before the model loads
    if not Path(args.model).is_dir():
        raise PredictError(f"--model {args.model}: no such model folder")
    if not (Path(args.model) / "config.json").is_file():
        raise PredictError(f"--model {args.model}: not a model folder (no config.json)")
    from distill.eval.sentibench import load_model, resolve_device, resolve_dtype
    from distill.fileio import writable_folder
    from distill.models.load import check_model_folder

    check_model_folder(Path(args.model), "--model")  # a BERT, missing or truncated weights: before any work
    resolve_dtype(args.dtype, resolve_device(args.device))
    if args.output:  # the predictions are written at the end: a path that cannot take them fails now
        if Path(args.output).is_dir():
            raise PredictError(f"--output {args.output} is a folder; give a file name, e.g. {Path(args.output) / 'preds.jsonl'}")
        writable_folder(Path(args.output).parent, "--output")
    if args.input:
        rows = read_jsonl(args.input)
    else:
        rows = [{"text": t} for t in args.text]
    texts = [r["text"] for r in rows]
    targets = [r.get("target", args.target) for r in rows]

    model, tok = load_model(args.model, args.dtype, args.device, False)
    preds = predict(model, tok, task, texts, shots=args.shots, seed=args.seed, targets=targets,
                    batch_size=args.batch_size, data_dir=args.data_dir, max_new_tokens=args.max_new_tokens)
    lines = []
    for r, p in zip(rows, preds):
        rec = {"id": r["id"]} if "id" in r else {}
        rec.update({"task": task, "text": r["text"]})
        rec.update(p)
        lines.append(json.dumps(rec, ensure_ascii=False))
    if args.output:
        Path(args.output).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        print(f"wrote {len(lines)} predictions to {args.output}", file=sys.stderr)
    else:
        for x in lines:
            print(x)
    return 0


def cli() -> int:
    """The ``distill-predict`` console script."""
    return run_cli(main, "predict")


if __name__ == "__main__":
    sys.exit(run_cli(main, "predict"))
