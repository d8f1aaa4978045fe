"""Subprocess body of the trainer tests: ``python _child.py spec.json``.

spec: {"cfg": RunConfig mapping, "sleep_per_step": seconds (to be killed mid-run), "record_rollouts": a
path: this rank's on-policy samples {step: {dataset index: response tokens}} as ``<path>.rank<R>``}.
"""

import json
import sys
import time

from distill.config import RunConfig, from_dict
from distill.train.build import build_trainer

from conftest import record_rollouts  # noqa: E402 - this script runs from tests/trainer


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
    seen = record_rollouts(tr) if record else None
    tr.train()
    if record:
        with open(f"{record}.rank{tr.env.rank}", "w") as fh:
            json.dump({str(step): {str(i): t for i, t in by.items()} for step, by in seen.items()}, fh)


if __name__ == "__main__":
    from distill.dist.env import exit_process

    main()
    exit_process(0)
