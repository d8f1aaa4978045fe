"""Subprocess body of the trainer tests: ``python _child.py spec.json``.

spec: {"cfg": RunConfig mapping, "sleep_per_step": seconds (to be killed mid-run)}.
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
    tr.train()


if __name__ == "__main__":
    main()
