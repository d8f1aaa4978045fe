"""Regenerate the small SentiBench sample shipped in distill/data/sample from the full data.

    python -m distill.data.make_sample [--data-dir ../shared/sentibench]

The first N records of each split, unchanged, as gzipped JSON lines named
``<category>-<dataset>.<split>.jsonl.gz`` (ATSA and ACSA share one file, as in the data). The sample
lets built-in defaults and an install without the data run end to end; scores computed on it are
flagged as such and are not comparable with the paper.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

from distill.data.locate import sentibench_dir
from distill.data.sentibench import SAMPLE_DIR, SPLITS, TASKS, read_raw, sample_file

# Records per split: a few hundred per dataset, under 1 MB in all (IMDB reviews are long).
SIZES = {"train": 200, "test": 200, "val": 100}
SMALLER = {"sc/imdb": {"train": 100, "test": 100, "val": 50}}


def write_jsonl_gz(path: Path, rows: list[dict]) -> int:
    buf = io.BytesIO()
    # mtime=0: the same input gives the same bytes, so regenerating does not dirty the repository.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="the full SentiBench folder (default: the resolution order)")
    ap.add_argument("--out", default=str(SAMPLE_DIR))
    args = ap.parse_args(argv)
    root = sentibench_dir(args.data_dir)
    if root is None:
        raise SystemExit("make_sample needs the full data: pass --data-dir or set $SENTIBENCH_DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for task in TASKS:
        if task == "absa/acsa_rest16":
            continue  # same file as absa/atsa_rest16
        for split in SPLITS:
            src = root / task / f"{split}.json"
            if not src.is_file():
                continue
            n = SMALLER.get(task, SIZES)[split]
            rows = read_raw(src)[:n]
            size = write_jsonl_gz(out / sample_file(task, split).name, rows)
            total += size
            print(f"{task:22s} {split:5s} {len(rows):4d} records {size / 1024:7.1f} KiB")
    print(f"total {total / 1024:.1f} KiB in {out}")


if __name__ == "__main__":
    main()
