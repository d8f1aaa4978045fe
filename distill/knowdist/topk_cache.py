"""``python -m distill.knowdist.topk_cache``: build the KnowDist run's offline top-k cache
(:func:`distill.teacher.topk_cache.build_topk_cache`) from its config, the corpus prepared first."""

from __future__ import annotations

import sys

from distill.config import ConfigError
from distill.teacher.topk_cache import SHARD_EXAMPLES, build_topk_cache, check_cache_config


def _take_flag(argv: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from argv; its value (None when absent)."""
    for i, a in enumerate(argv):
        if a == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            val = argv[i + 1]
            del argv[i:i + 2]
            return val
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.knowdist.topk_cache --config FILE [--section.key=value ...] [--out DIR]
    [--batch-size N] [--shard-examples N]``: the KnowDist launcher's config and overrides; with
    ``data.path`` empty the corpus is harvested first, as ``launchers/knowdist.py`` does."""
    from distill.config import load_config
    from distill.knowdist.stage import KnowDistConfig, prepare_corpus
    from distill.models.load import resolve_builtin

    argv = list(sys.argv[1:] if argv is None else argv)
    out = _take_flag(argv, "--out")
    ints = {}
    for flag in ("--batch-size", "--shard-examples"):
        v = _take_flag(argv, flag)
        if v is not None:
            if not v.isdigit() or int(v) < 1:
                raise ConfigError(f"{flag}={v}: must be an integer >= 1")
            ints[flag] = int(v)
    cfg, rest = load_config(KnowDistConfig, argv)
    rest = [a for i, a in enumerate(rest) if not (a.startswith(("--local_rank", "--local-rank"))
                                                   or (i > 0 and rest[i - 1] in ("--local_rank", "--local-rank")))]
    if rest:
        raise ConfigError(f"unknown arguments {rest} (use --section.key=value, --out DIR, --batch-size N, "
                          f"--shard-examples N)")
    check_cache_config(cfg)  # before the built-in models or the corpus are made
    student, teacher = resolve_builtin(cfg.model, cfg.run.out_dir)
    teacher_is_builtin = cfg.model.teacher == "builtin"
    cfg.model.student, cfg.model.teacher = student, teacher
    cfg.data.path = prepare_corpus(cfg, teacher_is_builtin)
    build_topk_cache(cfg, out, batch_size=ints.get("--batch-size", 0),
                     shard_examples=ints.get("--shard-examples", SHARD_EXAMPLES))
    return 0


if __name__ == "__main__":
    from distill.errors import run_cli

    sys.exit(run_cli(main, "topk_cache"))
