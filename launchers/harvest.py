"""KnowDist harvesting: a teacher writes sentiment analyses of unlabeled texts from several perspectives.

    # built-in default: SentiBench train texts (8 per task) x 8 perspectives, the built-in small
    # teacher (trained here, cached in runs/knowdist/builtin like launchers/knowdist.py's), a local
    # Ray service on loopback (here: inside `unshare -n bash -c 'ip link set lo up && ...'`):
    python launchers/harvest.py
    # a real teacher on a GPU node, 2 replicas x 4 pipeline shards, bf16:
    python launchers/harvest.py --config launchers/configs/qwen2.5-72b-instruct_harvest.yaml
    # override any key:
    python launchers/harvest.py --config FILE --teacher.replicas=4 --output.dir=/data/kd/corpus
    # SLURM (slurm/harvest.sh starts Ray over the allocation, runs this driver on the first node
    # with --teacher.ray_address=<the job's cluster>, and tears Ray down however the job ends):
    sbatch slurm/harvest.sh                                            # built-in default
    sbatch -N 4 --gres=gpu:8 --export=ALL,CONFIG=launchers/configs/qwen2.5-72b-instruct_harvest.yaml \
           slurm/harvest.sh --teacher.replicas=8 --teacher.shards=4 --output.dir=/data/kd/corpus

Re-running the same command after a crash, a pre-emption or ``kill -9`` resumes: finished shards
(listed in ``<output.dir>/manifest.json``) are kept, the rest is generated, no record is written
twice. A teacher actor that dies is restarted (``--teacher.max_restarts``, default 3) and its
requests re-sent (``--teacher.max_retries``, default 3), each with a one-line warning; past that
budget the harvest stops with one line (exit 2) naming the actor, the cause, what is kept and the
command that resumes. The corpus folder feeds ``launchers/knowdist.py --data.path=<output.dir>`` directly.
Config sections: input, perspectives, teacher, sampling, output (distill/knowdist/harvest.py and
docs/knowdist.md). ``--local_rank`` is accepted and ignored: harvesting is one driver process.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec


def _command(argv: list[str]) -> str:
    """This command line, to rerun it (the script as the user can reach it from here)."""
    import os
    import shlex

    script = os.path.abspath(__file__)
    rel = os.path.relpath(script)
    return shlex.join(["python", script if rel.startswith("..") else rel, *argv])


def main(argv: list[str] | None = None) -> int:
    from distill.config import ConfigError, load_config
    from distill.knowdist.harvest import HarvestConfig, harvest

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, rest = load_config(HarvestConfig, argv)
    rest = [a for a in rest if not (a.startswith("--local_rank") or a.startswith("--local-rank"))]
    if rest:
        raise ConfigError(f"unknown arguments {rest} (use --section.key=value; see the docstring)")
    if not cfg.teacher.model:
        # The built-in teacher was trained on its own prompt format and these perspective names.
        cfg.perspectives.prompt_style = "builtin"
        if not cfg.input.limit_per_task and cfg.input.source == "sentibench":
            cfg.input.limit_per_task = 8
        if cfg.sampling.max_new_tokens == 128:
            cfg.sampling.max_new_tokens = 48
        if not cfg.perspectives.names:
            from distill.models.builtin import PERSPECTIVES

            cfg.perspectives.names = list(PERSPECTIVES)
        if cfg.output.dir == "runs/harvest/corpus":
            cfg.output.dir = "runs/harvest/builtin"
    harvest(cfg, resume_command=_command(argv))
    return 0


if __name__ == "__main__":
    if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
        sys.exit("launchers/harvest.py: the distill package is not installed; run `pip install -e .` in the repository root")
    from distill.errors import run_cli

    sys.exit(run_cli(main, "harvest.py"))
