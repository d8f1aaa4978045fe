"""results.json -> a Markdown table in the paper's layout and a grouped bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from distill.errors import UserError


class ResultsFileError(UserError, ValueError):
    """A results.json given to ``sentibench plot`` is unreadable or not a SentiBench results file."""


class ResultsFileNotFound(ResultsFileError, FileNotFoundError):
    """A results.json given to ``sentibench plot`` does not exist."""

# Column order of the authors' table script (parse.py), grouped by category, then the averages.
PAPER_COLUMNS = (
    ("sc/imdb", "IMDB"), ("sc/yelp2", "Yelp2"), ("sc/sst2", "SST2"), ("sc/twitter", "Twitter"),
    ("multifaced/irony18", "Irony18"), ("multifaced/tweeteval", "TweetEval"),
    ("multifaced/pstance", "P-Stance"), ("multifaced/intimacy", "Intimacy"),
    ("absa/asqp_rest16", "ASQP"), ("absa/opener", "OpeNER"), ("absa/atsa_rest16", "ATSA"),
    ("absa/acsa_rest16", "ACSA"),
)
CATEGORY_COLUMNS = (("basic", "BSA"), ("multifaceted", "MSA"), ("fine-grained", "FSA"))


def load_results(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
    except FileNotFoundError:
        raise ResultsFileNotFound(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not valid JSON ({e})") from None
    for key in ("tasks", "overall", "categories"):
        if not isinstance(res, dict) or key not in res:
            raise ResultsFileError(f"{path}: not a SentiBench results.json (missing field {key!r})")
    return res


def _label(res: dict) -> str:
    name = str(res.get("model", "model")).rstrip("/").split("/")[-1]
    return name + (" (sample)" if res.get("sample") else "")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _row(res: dict) -> list:
    tasks, cats = res["tasks"], res["categories"]
    cells = [tasks.get(t, {}).get("score") for t, _ in PAPER_COLUMNS]
    cells += [cats.get(c, {}).get("score") for c, _ in CATEGORY_COLUMNS]
    cells.append(res["overall"].get("score"))
    return cells


def results_markdown(results: Sequence[dict]) -> str:
    head = ["Model"] + [h for _, h in PAPER_COLUMNS] + [h for _, h in CATEGORY_COLUMNS] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for res in results:
        lines.append("| " + " | ".join([_label(res)] + [_fmt(x) for x in _row(res)]) + " |")
    notes = []
    first = results[0]
    notes.append(
        f"Scores x100: macro-F1 (BSA, MSA), micro-F1 (ATSA, ACSA, ASQP), weighted tuple F1 (OpeNER); "
        f"mean over seeds {', '.join(map(str, first.get('seeds', [])))}, {first.get('shots')} shots, "
        "per-seed F1 rounded to 4 decimals first (as the authors' table script). Averages are unweighted; "
        "Avg over the datasets present."
    )
    for res in results:
        if res.get("sample"):
            notes.append(f"**{_label(res)}: computed on the packaged sample, not the full test sets; not comparable with the paper.**")
        if res.get("limit"):
            notes.append(f"**{_label(res)}: first {res['limit']} test examples per dataset only (--limit).**")
        failures = [
            f"{h} {res['tasks'][t]['parse_failures']}/{res['tasks'][t]['n'] * max(1, len(res['tasks'][t].get('seeds', {})))}"
            for t, h in PAPER_COLUMNS
            if "parse_failures" in res["tasks"].get(t, {})
        ]
        if failures:
            notes.append(f"{_label(res)}: unparseable answers (scored as empty), all seeds: {', '.join(failures)}.")
        if not res["overall"].get("complete", False):
            notes.append(f"{_label(res)}: {res['overall'].get('n_tasks')} of 12 datasets.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def plot_results(results: Sequence[dict], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """A grouped bar chart: one group per dataset (plus category and overall averages), one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [h for _, h in PAPER_COLUMNS] + [h for _, h in CATEGORY_COLUMNS] + ["Avg"]
    labels = list(labels) if labels else [_label(r) for r in results]
    n = len(results)
    x = np.arange(len(names))
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(10, len(names) * 0.9), 4.8))
    for k, res in enumerate(results):
        vals = [np.nan if v is None else v for v in _row(res)]
        ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=labels[k])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.axvline(len(PAPER_COLUMNS) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("score (x100)")
    ax.set_ylim(0, 100)
    title = "SentiBench"
    if any(r.get("sample") for r in results):
        title += " (packaged sample: not comparable with the paper)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
