"""Subprocess body of the trainer tests: ``python _child.py spec.json``.

spec: {"cfg": RunConfig mapping, "sleep_per_step": seconds (to be killed mid-run), "record_rollouts": a
path: this rank's on-policy samples {step: {dataset index: response tokens}} as ``<path>.rank<R>``}.
"""

import json
import sys
import time

from distill.config import RunConfig, from_dict
from distill.train.build import build_trainer


def main():
    spec = json.loads(open(sys.argv[1]).read())
    cfg = from_dict(RunConfig, spec["cfg"])
    cfg.validate()
    tr = build_trainer(cfg)
    pause = float(spec.get("sleep_per_step", 0))
    if pause:
        inner = tr.train_step

        def slow(step, micro=None):
            out = inner(step, micro)
            time.sleep(pause)
            return out

        tr.train_step = slow
    record = spec.get("record_rollouts")
    if record:
        seen = {}
        inner = tr.batches.rollout

        def rec(step, items, positions, indices):
            out = inner(step, items, positions, indices)
            for row_items, row_idx in zip(out, indices):
                for it, i in zip(row_items, row_idx):
                    if it["on_policy"]:
                        first = next(t for t, lab in enumerate(it["labels"]) if lab != -100)
                        seen.setdefault(str(step), {})[str(i)] = it["input_ids"][first:]
            return out

        tr.batches.rollout = rec
    tr.train()
    if record:
        with open(f"{record}.rank{tr.env.rank}", "w") as fh:
            json.dump(seen, fh)


if __name__ == "__main__":
    main()
