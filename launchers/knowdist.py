"""KnowDist: distil a teacher's sentiment knowledge into a student (CE on the teacher's analyses +
online token-level KL to the co-located teacher) with DeepSpeed ZeRO-3.

    # 1 process (CPU or 1 GPU), built-in tiny default: tokenizer + small teacher trained here (cached),
    # a small corpus harvested from that teacher, then the smaller student distilled from it:
    python launchers/knowdist.py
    # 1 node through deepspeed (CPU: gloo; GPUs: nccl), same default or a shipped config:
    deepspeed launchers/knowdist.py
    deepspeed --num_gpus 8 launchers/knowdist.py --config launchers/configs/qwen2.5-7b-instruct_to_qwen2.5-0.5b_knowdist.yaml --train.lr=1e-5
    # SLURM, 2 nodes x 8 GPUs (see slurm/ for the sbatch script):
    srun --nodes 2 --ntasks-per-node 1 deepspeed --num_gpus 8 --num_nodes 2 --launcher slurm --no_ssh_check launchers/knowdist.py --config FILE
    # CPU-only smoke test of 2 ranks on loopback:
    unshare -n bash -c 'ip link set lo up && deepspeed --num_gpus 2 --master_addr 127.0.0.1 launchers/knowdist.py'

Flags: ``--config FILE.yaml`` and ``--section.key=value`` (sections run, model, data, train, kd,
deepspeed, checkpoint, log, eval, harvest; see docs/trainer.md), ``--resume`` (= checkpoint.resume
latest), ``--local_rank`` / ``$LOCAL_RANK`` (set by the deepspeed launcher), ``--debug`` (or
``DISTILL_DEBUG=1``: the traceback of user errors, which otherwise are one line and exit status 2).

With ``data.path`` empty, a corpus is harvested first: the teacher writes analyses of SentiBench
train texts from several perspectives (``harvest.*``), one JSONL record per (text, perspective) with
prompt and response; then the student is trained on it. A real teacher writes through its chat
template (perspective = system message, text = user message) into ``<run.out_dir>/corpus``; only the
built-in tiny teacher uses its own ``Text:/Perspective:`` format. A given corpus (``data.path`` = JSONL,
Parquet, a folder of shards from ``launchers/harvest.py``, or a datasets name) skips that step.
The built-in default (1 process) ends with the student's SentiBench quick-slice score beside the
teacher's and the untrained student's, and the path to a plot (distill.knowdist.stage.QUICK_EVAL).
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
    sys.exit("launchers/knowdist.py: the distill package is not installed; run `pip install -e .` in the repository root")

from distill.config import ConfigError, load_config  # noqa: E402
from distill.knowdist.stage import KnowDistConfig, run  # noqa: E402


def _drop_local_rank(rest: list[str]) -> list[str]:
    """``--local_rank N`` / ``--local_rank=N`` are the deepspeed launcher's, read through read_env."""
    return [a for i, a in enumerate(rest) if not (a.startswith("--local_rank") or a.startswith("--local-rank")
                                                   or (i > 0 and rest[i - 1] in ("--local_rank", "--local-rank")))]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv:
        argv.remove("--resume")
        argv.append("--checkpoint.resume=latest")
    cfg, rest = load_config(KnowDistConfig, argv)  # parse + validate
    rest = _drop_local_rank(rest)
    if rest:
        raise ConfigError(f"unknown arguments {rest} (use --section.key=value; see the docstring)")
    return run(cfg, argv)  # build + run: distill.knowdist.stage


if __name__ == "__main__":
    from distill.errors import run_cli

    from distill.dist.env import exit_process

    exit_process(run_cli(main, "knowdist.py"))  # several ranks: ends without the interpreter's teardown of gloo
