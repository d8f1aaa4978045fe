"""ICLDist's config: settings the trainer config would override or the report would trip on are
refused when the config is read."""

from __future__ import annotations

import pytest

from distill.config import ConfigError, load_config
from distill.icldist.config import ICLDistConfig


@pytest.mark.parametrize("argv,msg", [
    # trainer_config() replaces it with the icldist backend: it was ignored without a word
    (["--kd.teacher_backend=colocated"], "kd.teacher_backend='colocated': ICLDist's teacher is the icldist backend"),
    # the report after training failed on it with a KeyError traceback
    (["--report.tasks=sc/sst3"], "report.tasks='sc/sst3': unknown SentiBench task(s) ['sc/sst3']"),
    (["--teacher.max_new_tokens=0"], "teacher.max_new_tokens=0 must be >= 1"),
    (["--kd.impl=tritn"], "kd.impl='tritn': auto | torch | triton"),  # the trainer's own checks run on its config
])
def test_icldist_config_refuses(argv, msg):
    with pytest.raises(ConfigError) as e:
        load_config(ICLDistConfig, argv)
    assert msg in str(e.value)


def test_icldist_trainer_config_keeps_its_backend():
    cfg, _ = load_config(ICLDistConfig, [])
    tc = cfg.trainer_config()
    assert (tc.kd.teacher_backend, tc.data.name) == ("icldist", "icldist")
