"""ICLDist: distil in-context sentiment skills from a teacher on diversified few-shot prompts.

    # 1 process, built-in tiny default (CPU is fine; private loopback Ray teacher, then the report):
    python launchers/icldist.py
    # 1 node through deepspeed (student ranks; the teacher service is shared by all ranks):
    deepspeed --num_gpus 8 launchers/icldist.py --config launchers/configs/qwen2.5-7b-instruct_to_qwen2.5-0.5b_icldist.yaml
    # SLURM (Ray head on node 0, workers elsewhere, students by srun): see slurm/icldist.sh
    srun python launchers/icldist.py --config FILE --teacher.ray_address=HOST:PORT
    # offline teacher targets: cache once, then train with no teacher running
    python launchers/icldist.py --stage cache --config FILE
    deepspeed launchers/icldist.py --config FILE --teacher.source=cache

Flags (everything else is ``--section.key=value``, see distill/icldist/config.py and docs/icldist.md):

    --config FILE                 YAML with any of the sections run, model, prompts, teacher, icl, train, kd,
                                  deepspeed, checkpoint, log, report (train/kd/deepspeed/... = the core trainer's)
    --stage all|prompts|cache|train|eval
                                  all (default): prompts -> (cache if teacher.source=cache) -> train -> eval
    --run.out_dir=DIR             run folder (default runs/icldist): prompts.jsonl, teacher_cache/,
                                  checkpoints, export/ (the student), export/results.{json,md,png}
    --model.teacher=builtin|PATH|HF_NAME     the teacher (default: the built-in tiny teacher)
    --model.student=builtin|PATH|HF_NAME     student init: the KnowDist export; builtin = tiny student
    --teacher.source=online|cache online: Ray teacher service during training (prefetched top-k);
                                  cache: read teacher.cache_dir (built by --stage cache)
    --teacher.ray_address=ADDR    HOST:PORT or "auto" of a running Ray cluster (SLURM);
                                  "" (default): a private loopback Ray on 127.0.0.2 started here;
                                  "local": in-process teacher, no Ray
    --teacher.replicas=N --teacher.shards=N --teacher.num_gpus=G (per shard actor; -1 = auto)
    --teacher.k=64                top-k per target position
    --teacher.cache_dir=DIR       default <out_dir>/teacher_cache
    --prompts.held_out=a,b        SentiBench tasks left out of training entirely
    --report.limit=N              test sentences per task in the SentiBench report (0 = all)
    --local_rank / $LOCAL_RANK    accepted (deepspeed); RANK / WORLD_SIZE from the environment
    $RAY_NODE_IP                  optional: the address this process's Ray driver binds to when it joins a
                                  cluster (e.g. 127.0.0.x in single-host tests)

With several student ranks, rank 0 builds the prompt set (and, in online mode, the teacher's
fine-grained answers) and starts or connects to the teacher service; every rank sends its own
batches' top-k requests to that service. The report is written by rank 0 after training.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec


def main(argv: list[str] | None = None) -> int:
    from distill.icldist.stage import run_from_argv

    return run_from_argv(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    if find_spec("distill") is None:  # a source checkout runs what is installed, never its own tree
        sys.exit("launchers/icldist.py: the distill package is not installed; run `pip install -e .` in the repository root")
    from distill.errors import run_cli

    from distill.dist.env import exit_process

    exit_process(run_cli(main, "icldist.py"))  # several ranks: ends without the interpreter's teardown of gloo
