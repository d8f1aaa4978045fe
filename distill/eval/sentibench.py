"""SentiBench: evaluate a causal LM with the protocol of the paper's own evaluation code.

    sentibench run --model PATH_OR_HF_NAME [--tasks all|basic|multifaceted|fine-grained|sc/sst2,...]
                   [--shots 4] [--seeds 42,52,62] [--limit N] [--batch-size 8] [--out DIR] [--data-dir D]
    torchrun --nproc-per-node 8 -m distill.eval.sentibench run --model ...   # test sets split over ranks
    sentibench score --task sc/sst2 --predictions preds.jsonl       # {"index": i, "prediction": ...} lines
    sentibench plot A/results.json B/results.json -o compare.png
    sentibench download                                              # the data into the user cache

(``sentibench`` = ``python -m distill.eval.sentibench``.) ``run`` writes DIR/results.json,
DIR/results.md (the paper's table layout), DIR/results.png and DIR/predictions/<task>.seed<k>.jsonl
(re-scorable with ``score``). Scores are x100; see docs/sentibench.md for the protocol and its quirks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable, Sequence

from distill.data.sentibench import (
    CATEGORIES,
    CATEGORY_OF,
    FINE_GRAINED,
    TASKS,
    SentiBenchDataError,
    data_provenance,
    data_source,
    is_sample,
    load_task,
    resolve_tasks,
    task_file,
)
from distill.dist.env import print0
from distill.errors import UserError
from distill.eval.protocol import LABEL_WORDS, MAX_NEW_TOKENS, build_prompts
from distill.eval.scoring import label_set, out_of_label_set, score_task
from distill.runinfo import versions

PROTOCOL = "HITSZ-HLT/Sentiment-Distillation@2810fc2826e8f7c2ae6a0d6dd328ab7d8979744a (icl_multifaced.py, fsa.py, parse_utils/)"
DATA_URL = "https://codeload.github.com/HITSZ-HLT/Sentiment-Distillation/tar.gz/{ref}"
DATA_REF = "2810fc2826e8f7c2ae6a0d6dd328ab7d8979744a"
DEFAULT_SEEDS = (42, 52, 62)
DEFAULT_MAX_BATCH_TOKENS = 32768  # padded tokens per call: bounds attention/KV memory on long IMDB prompts


class SentiBenchUsageError(UserError, ValueError):
    """A value or file given to the sentibench commands is wrong (a model, a limit, a task list)."""


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def aggregate(per_seed: dict[str, dict[str, dict]], tasks: Sequence[str]) -> dict:
    """Per-task scores (mean over seeds of the 4-decimal-rounded fraction, x100), category and overall averages."""
    out_tasks = {}
    for task in tasks:
        seeds = per_seed[task]
        entry: dict[str, Any] = {
            "category": CATEGORY_OF[task],
            "metric": "macro_f1" if task not in FINE_GRAINED else ("weighted_tuple_f1" if task == "absa/opener" else "micro_f1"),
            "n": next(iter(seeds.values()))["n"],
        }
        # The authors' result.txt stores round(f1, 4) per run; their table averages those, x100.
        entry["score"] = 100 * _mean(round(m["f1"], 4) for m in seeds.values())
        keys = ("acc",) if task not in FINE_GRAINED else ("precision", "recall")
        for k in keys:
            entry[k] = 100 * _mean(round(m[k], 4) for m in seeds.values())
        if task in FINE_GRAINED:
            entry["parse_failures"] = sum(m["parse_failures"] for m in seeds.values())
        entry["demo_repairs"] = sum(m.get("demo_repairs", 0) for m in seeds.values())
        entry["seeds"] = seeds
        out_tasks[task] = entry
    categories = {}
    for cat, members in CATEGORIES.items():
        present = [t for t in members if t in out_tasks]
        if present:
            categories[cat] = {
                "score": _mean(out_tasks[t]["score"] for t in present),
                "tasks": present,
                "complete": len(present) == len(members),
            }
    overall = {
        "score": _mean(e["score"] for e in out_tasks.values()),
        "n_tasks": len(out_tasks),
        "complete": len(out_tasks) == len(TASKS),
    }
    return {"tasks": out_tasks, "categories": categories, "overall": overall}


def evaluate(
    model,
    tokenizer,
    *,
    tasks: str | Iterable[str] = "all",
    shots: int = 4,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | os.PathLike | None = None,
    split: str | Mapping[str, str] = "test",
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
    early_stop: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    predictions_dir: str | os.PathLike | None = None,
    local: bool = False,
) -> dict:
    """Evaluate ``model`` on SentiBench; returns the results.json structure (scores x100).

    Callable from a training loop: under torch.distributed every rank must call it (each scores its
    share), unless ``local`` (this process scores everything and calls no collective, so one rank may
    call it alone). The model is put in eval mode and restored. ``split="val"`` evaluates on a held-out slice where a task has one;
    a mapping ``{task: split}`` picks each task's split (recorded as ``results["split"]`` when they differ).
    ``limit`` keeps the first N examples (their demonstrations are those of the full run).
    """
    from distill.eval.runner import Runner

    task_list = resolve_tasks(tasks)
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise SentiBenchUsageError("at least one seed is needed")
    if limit is not None and limit < 1:
        raise SentiBenchUsageError(f"limit must be >= 1 (None = every example), got {limit}")
    if max_new_tokens < 1:
        raise SentiBenchUsageError(f"max_new_tokens must be >= 1 (the fine-grained answer's budget), got {max_new_tokens}")
    splits = {t: (split.get(t, "test") if isinstance(split, Mapping) else split) for t in task_list}
    verbalizers, plans = _plan_runs(tokenizer, task_list, splits, seeds, shots, limit, data_dir)
    runner = Runner(model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                    max_new_tokens=max_new_tokens, early_stop=early_stop, local=local)
    per_seed, elapsed = _run_plans(model, runner, plans, verbalizers, task_list, shots=shots, progress=progress,
                                   predictions_dir=predictions_dir)
    results = {
        "benchmark": "SentiBench",
        "format": 1,
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "shots": shots,
        "seeds": list(seeds),
        "limit": limit,
        "split": next(iter(set(splits.values()))) if len(set(splits.values())) == 1 else splits,
        "data": data_source(data_dir),
        "sample": is_sample(data_dir),
        "data_source": data_provenance(data_dir),  # {"source": "full" | "sample", "path": ...}
        "protocol": PROTOCOL,
        "max_new_tokens": max_new_tokens,
        "world_size": runner.world,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "elapsed_s": round(elapsed, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    results.update(aggregate(per_seed, task_list))
    return results


def _plan_runs(tokenizer, task_list, splits, seeds, shots, limit, data_dir) -> tuple[dict, list]:
    """(verbalizer ids per classification task, [(task, seed, records, prompts, repairs)] in run order).

    Everything that can fail on the data fails here, before any model call: colliding label words,
    missing files."""
    from distill.eval.runner import verbalizer_ids

    verbalizers = {t: verbalizer_ids(tokenizer, t) for t in task_list if t in LABEL_WORDS}
    plans = []
    for task in task_list:
        tests = load_task(task, splits[task], data_dir)[:limit]
        warn_gold_outside_label_set(task, tests, task_file(task, splits[task], data_dir))
        pool = load_task(task, "train", data_dir)
        for seed in seeds:
            prompts, repairs = build_prompts(task, tests, pool, shots, seed)
            plans.append((task, seed, tests, prompts, repairs))
    return verbalizers, plans


def _run_plans(model, runner, plans, verbalizers, task_list, *, shots, progress,
               predictions_dir) -> tuple[dict, float]:
    """Score every plan with the model in eval mode (restored after): ({task: {seed: metrics}}, seconds
    spent scoring). Rank 0 shows the progress bar and writes the predictions files."""
    rank = runner.rank
    bar = None
    encoded = [runner.tokenize(p[3]) for p in plans]
    if progress and rank == 0:
        from distill.progress import progress as progress_bar

        total = sum(runner.count_batches([len(e) for e in enc], p[0] in FINE_GRAINED) for p, enc in zip(plans, encoded))
        bar = progress_bar(total, "sentibench", unit="batch", dynamic_ncols=True)
        runner.on_batch = bar.update

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    per_seed: dict[str, dict[str, dict]] = {t: {} for t in task_list}
    try:
        for (task, seed, tests, prompts, repairs), enc in zip(plans, encoded):
            if bar is not None:
                bar.set_postfix_str(f"{task} seed {seed}")
            if task in FINE_GRAINED:
                preds: list = runner.generate(enc, shots)
            else:
                words = [w.strip() for w in LABEL_WORDS[task]]
                preds = [words[k] for k in runner.classify(enc, verbalizers[task])]
            metrics = score_task(task, tests, preds)
            metrics["demo_repairs"] = repairs
            per_seed[task][str(seed)] = metrics
            if predictions_dir is not None and rank == 0:
                _write_predictions(Path(predictions_dir), task, seed, tests, preds)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return per_seed, time.perf_counter() - t0


def _write_predictions(out: Path, task: str, seed: int, tests, preds) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(predictions_file(out, task, seed), "w", encoding="utf-8") as fh:
        for r, p in zip(tests, preds):
            fh.write(json.dumps({"index": r.index, "prediction": p}, ensure_ascii=False) + "\n")


def write_results(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    from distill.eval.report import plot_results, results_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(paths["json"])
    paths["md"].write_text(results_markdown([results]), encoding="utf-8")
    plot_results([results], paths["png"])
    return paths


def summary_line(results: dict) -> str:
    return json.dumps(
        {
            "model": results["model"],
            # results written before data_source existed have only "sample"
            "data": results.get("data_source", {}).get("source") or ("sample" if results["sample"] else "full"),
            "sample": results["sample"],
            "limit": results["limit"],
            "overall": results["overall"]["score"],
            **{c: v["score"] for c, v in results["categories"].items()},
            **{t: v["score"] for t, v in results["tasks"].items()},
        }
    )


# ------------------------------------------------------------------------------------------- score


def predictions_file(predictions_dir: str | os.PathLike, task: str, seed: int) -> Path:
    """Where :func:`evaluate` writes a task's predictions for one demonstration seed."""
    return Path(predictions_dir) / f"{task.replace('/', '-')}.seed{seed}.jsonl"


def read_predictions(path: str | os.PathLike, n: int) -> list:
    """``{"index": i, "prediction": ...}`` lines covering exactly indices 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise SentiBenchDataError(f"{path}: predictions file not found")
    seen: dict[int, int] = {}
    preds: list = [None] * n
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SentiBenchDataError(f"{path}: line {lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise SentiBenchDataError(f"{path}: line {lineno}: must be a JSON object with 'index' and 'prediction'")
            for key in ("index", "prediction"):
                if key not in obj:
                    raise SentiBenchDataError(f"{path}: line {lineno}: missing field {key!r}")
            i = obj["index"]
            if not isinstance(i, int) or isinstance(i, bool):
                raise SentiBenchDataError(f"{path}: line {lineno}: field 'index' must be an integer, got {i!r}")
            if not 0 <= i < n:
                raise SentiBenchDataError(f"{path}: line {lineno}: index {i} out of range 0..{n - 1}")
            if i in seen:
                raise SentiBenchDataError(f"{path}: line {lineno}: duplicate index {i} (first on line {seen[i]})")
            seen[i] = lineno
            preds[i] = obj["prediction"]
    missing = [i for i in range(n) if i not in seen]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        hint = f" (to score only the first {len(seen)}, pass --limit {len(seen)})" if missing[0] == len(seen) else ""
        raise SentiBenchDataError(f"{path}: missing predictions for {len(missing)} of {n} indices: {shown}{hint}")
    return preds


def score_file(task: str, predictions: str | os.PathLike, *, data_dir=None, split: str = "test", limit: int | None = None) -> dict:
    """Scores (x100) of a predictions file; ``limit``: the first N records (None = all, else >= 1).

    Classification predictions outside the task's label set are misses; the result counts them
    (``out_of_label_set``) and names them (``out_of_label_set_labels``: ``{label: count}``).
    """
    if limit is not None and limit < 1:
        raise SentiBenchUsageError(f"--limit must be >= 1 (omit it to score every example), got {limit}")
    records = load_task(resolve_tasks([task])[0], split, data_dir)[:limit]
    preds = read_predictions(predictions, len(records))
    warn_gold_outside_label_set(task, records, task_file(task, split, data_dir))
    m = score_task(task, records, preds)
    out: dict[str, Any] = {"task": task, "split": split, "sample": is_sample(data_dir),
                           "data": data_provenance(data_dir)["source"]}
    if task in LABEL_WORDS:
        out["out_of_label_set_labels"] = dict(out_of_label_set(task, preds).most_common())
    for k, v in m.items():
        out[k] = 100 * v if k in ("f1", "acc", "precision", "recall") else v
    return out


_GOLD_WARNED: set[str] = set()


def warn_gold_outside_label_set(task: str, records: Sequence, path: Path) -> str | None:
    """Warn once per file (on stderr, rank 0) when gold labels of a classification task fall outside
    its label set; returns the warning (None when there is nothing to say).

    The authors' scorer (scikit-learn's macro-F1 over the union of gold and predicted labels) counts
    such rows: the model can only answer a label word, so each is a miss, and each such gold label
    adds a class of F1 0 to the average. We score them the same way, and say so.
    """
    from distill.eval.scoring import gold_outside_label_set

    bad = gold_outside_label_set(task, records)
    if not bad:
        return None
    index, label = bad[0]
    msg = (f"sentibench: warning: {path}: {len(bad)} of {len(records)} gold labels are not in the {task} label set "
           f"({', '.join(label_set(task))}), the first {label!r} at record {index}; they are scored as the authors' "
           f"scorer does (always a miss, and a class of F1 0 in the macro average): fix the file if they are typos")
    if str(path) not in _GOLD_WARNED:
        _GOLD_WARNED.add(str(path))
        print0(msg, file=sys.stderr)
    return msg


# --------------------------------------------------------------------------------------- download


def download(dest: str | os.PathLike | None = None, *, ref: str = DATA_REF, url: str | None = None, force: bool = False) -> Path:
    """Fetch the authors' ``datasets/`` folder (a GitHub tarball) into the user cache; returns its path."""
    import shutil
    import tarfile
    import tempfile
    import urllib.request

    from distill.data.locate import cache_dir

    dest = Path(dest) if dest else cache_dir() / "sentibench"
    if dest.exists() and not force:
        print(f"{dest} exists; pass --force to replace it")
        return dest
    url = url or DATA_URL.format(ref=ref)
    from distill.fileio import writable_folder

    writable_folder(dest.parent, "--dest")  # before the download, not after it
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".sentibench-") as tmp:
        archive = Path(tmp) / "repo.tar.gz"
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        except (OSError, ValueError) as e:  # URLError/HTTPError are OSErrors; ValueError: not a URL
            raise SentiBenchUsageError(f"{url}: download failed ({e}); check --url/--ref, or put the data in "
                                       f"$SENTIBENCH_DIR yourself") from e
        staged = Path(tmp) / "sentibench"
        try:
            tar = tarfile.open(archive, "r:gz")
        except tarfile.TarError as e:
            raise SentiBenchUsageError(f"{url}: not a .tar.gz archive ({e})") from e
        with tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # <repo>-<ref>/datasets/<category>/<dataset>/<file>
                if len(parts) < 3 or parts[1] != "datasets" or not member.isfile():
                    continue
                rel = Path(*parts[2:])
                if rel.is_absolute() or ".." in rel.parts or rel.name == ".DS_Store":
                    continue
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
        missing = [t for t in TASKS for s in ("train", "test") if not (staged / t / f"{s}.json").is_file()]
        if missing:
            raise SentiBenchUsageError(f"{url}: the archive lacks {len(missing)} SentiBench files, e.g. {missing[0]} "
                                       f"(is it the HITSZ-HLT/Sentiment-Distillation repository?)")
        if dest.exists():
            shutil.rmtree(dest)
        staged.replace(dest)
    print(f"SentiBench data in {dest}")
    return dest


# -------------------------------------------------------------------------------------------- CLI


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _task_list(text: str) -> list[str]:
    try:
        return resolve_tasks(text)
    except KeyError as e:
        raise argparse.ArgumentTypeError(e.args[0] if e.args else str(e)) from None


def label_warning(res: dict) -> str | None:
    """The one-line warning of a scored task whose predictions fall outside its label set, or None."""
    bad = res.get("out_of_label_set_labels") or {}
    if not bad:
        return None
    shown = ", ".join(f"{k!r} x{v}" for k, v in list(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
    return (f"sentibench score: warning: {res['task']}: {sum(bad.values())} of {res['n']} predictions are not in "
            f"the label set ({', '.join(label_set(res['task']))}) and were scored as misses: {shown}")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace(" ", ",").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None


DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_device(text: str) -> str:
    """``--device`` (auto | cpu | cuda | cuda:N) as a device this machine has, or a one-line error
    saying what it has instead."""
    import torch

    if text == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SentiBenchUsageError(f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SentiBenchUsageError(f"--device {text}: this machine has no usable CUDA device (torch "
                                       f"{torch.__version__} sees none); use --device cpu (or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise SentiBenchUsageError(f"--device {text}: this machine has {n} CUDA device(s), cuda:0 to "
                                       f"cuda:{n - 1}; pick one of those (or auto)")
    elif dev.type != "cpu":
        raise SentiBenchUsageError(f"--device {text}: only cpu and cuda devices are supported; use auto, cpu or cuda:N")
    return text


def resolve_dtype(text: str, device: str):
    """``--dtype`` as a torch dtype that works on ``device``; auto = bfloat16 on a GPU that has it, else
    float32. A dtype the device cannot compute in is a one-line error naming one that works."""
    import torch

    if text not in DTYPES:
        raise SentiBenchUsageError(f"--dtype {text!r}: one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if text == "auto":
        return torch.bfloat16 if cuda and _bf16_on_gpu(device) else torch.float32
    dtype = getattr(torch, text)
    if dtype is torch.bfloat16 and cuda and not _bf16_on_gpu(device):
        name = torch.cuda.get_device_name(torch.device(device))
        raise SentiBenchUsageError(f"--dtype bfloat16: {name} ({device}) has no bfloat16 arithmetic; use --dtype "
                                   f"float16 or float32 (or auto)")
    if dtype is not torch.float32 and not cuda:
        try:  # what a forward needs: a matmul and a softmax in that dtype
            torch.ones(2, 2, dtype=dtype).matmul(torch.ones(2, 2, dtype=dtype)).softmax(-1)
        except RuntimeError as e:
            raise SentiBenchUsageError(f"--dtype {text}: this torch ({torch.__version__}) cannot compute in {text} on "
                                       f"the CPU ({str(e).splitlines()[0]}); use --dtype float32 (or auto)") from None
    return dtype


def _bf16_on_gpu(device: str) -> bool:
    import torch

    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8  # Ampere and later compute in bfloat16; earlier GPUs only emulate it


def load_model(name: str, dtype: str, device: str, trust_remote_code: bool):
    """(model, tokenizer) of ``--model`` on ``--device`` in ``--dtype``, through the shared model loader
    (distill.models.load: a folder without config.json, weights or tokenizer, truncated weights, or a
    model that is not a causal LM is a one-line error naming the folder)."""
    from distill.models.load import check_hub_config, check_model_folder, load_causal_lm, load_tokenizer, local_folder

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    folder = local_folder(name, "--model")
    if folder is not None:  # what the folder is first (a BERT has tokenizer files but is not a causal LM)
        check_model_folder(folder, "--model")
    else:
        check_hub_config(name, "--model", trust_remote_code=trust_remote_code)
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code, what="--model")
    model = load_causal_lm(name, dtype=torch_dtype, attn=None, device=device, trust_remote_code=trust_remote_code,
                           what="--model")
    return model, tok


def _init_distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)


def model_label(model: str) -> str:
    """What results name a model by: a student exported by this project (its folder holds
    ``distill_run.json``) by its run and step, ``<run> (step N)``, since the folder itself is usually
    called ``export``; anything else by the name or path given."""
    info = Path(model) / "distill_run.json"
    if not info.is_file():
        return model
    try:
        d = json.loads(info.read_text(encoding="utf-8"))
        run = d.get("config", {}).get("run", {})
        name = run.get("name") or Path(run.get("out_dir") or Path(model).resolve().parent).name
    except (ValueError, AttributeError, TypeError):
        return model
    return f"{name} (step {d.get('step')})" if d.get("step") is not None else str(name)


def cmd_run(args) -> int:
    if args.cpu_threads:
        import torch

        torch.set_num_threads(args.cpu_threads)
    resolve_dtype(args.dtype, resolve_device(args.device))  # a device or dtype this machine lacks: before anything
    _init_distributed()
    from distill.eval.runner import dist_info
    from distill.fileio import writable_folder

    out = Path(args.out)
    if dist_info()[0] == 0:  # the results go there after the whole evaluation: a bad --out fails now
        writable_folder(out / "predictions", "--out")
    model, tok = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    results = evaluate(
        model, tok, tasks=args.tasks, shots=args.shots, seeds=args.seeds, limit=args.limit,
        batch_size=args.batch_size, data_dir=args.data_dir, split=args.split,
        max_new_tokens=args.max_new_tokens, max_batch_tokens=args.max_batch_tokens,
        early_stop=not args.no_early_stop, progress=not args.no_progress, model_name=model_label(args.model),
        predictions_dir=out / "predictions",
    )
    results["model_path"] = args.model
    if dist_info()[0] == 0:
        paths = write_results(results, out)
        print(paths["md"].read_text(encoding="utf-8"))
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} ({results['elapsed_s']:.1f} s)")
        print(summary_line(results))
    return 0


def cmd_score(args) -> int:
    res = score_file(args.task, args.predictions, data_dir=args.data_dir, split=args.split, limit=args.limit)
    if res["sample"]:
        print("note: scored against the packaged sample (no SentiBench data found)", file=sys.stderr)
    warning = label_warning(res)
    if warning:
        print(warning, file=sys.stderr)
    print(json.dumps(res))
    return 0


def cmd_plot(args) -> int:
    from distill.eval.report import load_results, plot_results

    from distill.fileio import writable_folder

    writable_folder(Path(args.output).parent, "-o/--output")
    results = [load_results(p) for p in args.results]
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(results):
        raise SentiBenchUsageError(f"--labels has {len(labels)} names for {len(results)} result files")
    print(plot_results(results, args.output, labels))
    return 0


def cmd_download(args) -> int:
    download(args.dest, ref=args.ref, url=args.url, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sentibench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    data_help = "SentiBench folder (default: $SENTIBENCH_DIR, ../shared/sentibench, the download cache, else the packaged sample; 'sample' forces it)"
    r = sub.add_parser("run", help="evaluate a model and write results.json/.md/.png")
    r.add_argument("--model", required=True, help="local folder or Hugging Face name of a causal LM")
    r.add_argument("--tasks", type=_task_list, default="all", help="all | basic | multifaceted | fine-grained | comma list of tasks")
    r.add_argument("--shots", type=_at_least(0), default=4, help="demonstrations per prompt")
    r.add_argument("--seeds", type=_seeds, default=DEFAULT_SEEDS, help="demonstration seeds, e.g. 42,52,62")
    r.add_argument("--limit", type=_at_least(1), default=None, help="first N >= 1 test examples per dataset (default: all)")
    r.add_argument("--batch-size", type=_at_least(1), default=8, help="prompts per model call")
    r.add_argument("--max-batch-tokens", type=_at_least(1), default=DEFAULT_MAX_BATCH_TOKENS,
                   help="cap on padded tokens (prompt + new tokens) per model call; IMDB prompts are long")
    r.add_argument("--max-new-tokens", type=_at_least(1), default=MAX_NEW_TOKENS, help="fine-grained generation budget")
    r.add_argument("--no-early-stop", action="store_true", help="always generate max-new-tokens (same scores, slower)")
    r.add_argument("--split", default="test", choices=("test", "val"))
    r.add_argument("--out", default="sentibench_results", help="output folder")
    r.add_argument("--data-dir", default=None, help=data_help)
    r.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--trust-remote-code", action="store_true")
    r.add_argument("--cpu-threads", type=int, default=None,
                   help="torch intra-op threads on CPU (1 is fastest for tiny models on a busy machine)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("score", help="score a predictions file (no model needed)")
    s.add_argument("--task", required=True, choices=TASKS)
    s.add_argument("--predictions", required=True, help='JSON lines {"index": i, "prediction": ...}')
    s.add_argument("--split", default="test", choices=("test", "val"))
    s.add_argument("--limit", type=_at_least(1), default=None, help="score the first N >= 1 examples only (default: all)")
    s.add_argument("--data-dir", default=None, help=data_help)
    s.set_defaults(func=cmd_score)

    p = sub.add_parser("plot", help="grouped bar chart of several results.json")
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--output", default="sentibench.png")
    p.add_argument("--labels", default=None, help="comma-separated legend names")
    p.set_defaults(func=cmd_plot)

    d = sub.add_parser("download", help="fetch the data from the authors' repository into the user cache")
    d.add_argument("--dest", default=None, help="default: $DISTILL_CACHE or ~/.cache/distill, folder sentibench")
    d.add_argument("--ref", default=DATA_REF, help="commit of HITSZ-HLT/Sentiment-Distillation")
    d.add_argument("--url", default=None, help="tarball URL (a mirror)")
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=cmd_download)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The commands; a user error raises a :class:`~distill.errors.UserError` (``__main__`` runs this
    under :func:`distill.errors.run_cli`: one line on stderr, exit status 2)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from distill.errors import run_cli

    sys.exit(run_cli(main, "sentibench"))
