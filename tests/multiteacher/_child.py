"""Subprocess body of the multi-teacher dist test: ``python _child.py spec.json``; trains, then each
rank writes its learned weights (meta state, the whole gate gathered) to ``<out_dir>/rank<r>.json``."""

import json
import os
import sys

import torch

from distill.config import RunConfig, from_dict
from distill.multiteacher.stage import make_trainer
from distill.multiteacher.weighting import GATE_NAME


def main():
    spec = json.loads(open(sys.argv[1]).read())
    cfg = from_dict(RunConfig, spec["cfg"])
    cfg.validate()
    tr = make_trainer(cfg)
    tr.train()
    out = {}
    s = tr.callbacks[0].strategy
    if s.name == "meta":
        out["meta"] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in s.state_dict().items()}
    gate = getattr(tr.engine.module, GATE_NAME, None)
    if gate is not None:
        params = list(gate.parameters())
        if tr.engine.kind == "deepspeed" and tr.engine.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                out["gate"] = [p.detach().float().flatten().tolist() for p in params]
        else:
            out["gate"] = [p.detach().float().flatten().tolist() for p in params]
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(cfg.run.out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
