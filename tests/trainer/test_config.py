"""Run config: precedence, unknown keys, cross-field validation, DeepSpeed config injection."""

from __future__ import annotations

import json

import pytest

from distill.config import ConfigError, RunConfig, load_config


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.001\n  micro_batch: 3\nkd:\n  kind: jsd\n")
    cfg, rest = load_config(RunConfig, ["--config", str(y), "--train.lr=5e-4", "--local_rank=0"])
    assert cfg.train.lr == 5e-4  # CLI beats YAML
    assert cfg.train.micro_batch == 3  # YAML beats default
    assert cfg.kd.kind == "jsd"
    assert cfg.train.grad_accum == RunConfig().train.grad_accum  # default kept
    assert rest == ["--local_rank=0"]


@pytest.mark.parametrize("argv,needle", [
    (["--train.learning_rate=1"], "learning_rate"),
    (["--trian.lr=1"], "trian"),
])
def test_unknown_keys_are_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, argv)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("kd:\n  temprature: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*temprature"):
        load_config(RunConfig, ["--config", str(y)])


@pytest.mark.parametrize("argv,msg", [
    (["--train.steps=5", "--train.warmup_steps=10"], "warmup_steps=10 exceeds train.steps=5"),
    (["--kd.kind=kl"], "kd.kind='kl'"),
    (["--kd.temperature=0"], "kd.temperature=0.0"),
    (["--train.micro_batch=0"], "micro_batch=0"),
    (["--kd.kind=none", "--kd.ce_weight=0"], "nothing to train"),
    (["--checkpoint.keep_last=0"], "keep_last=0"),
    # accepted before, though no one can mean them
    (["--run.out_dir="], "run.out_dir is empty"),
    (["--train.adam_eps=inf"], "train.adam_eps=inf must be a finite number > 0"),
    (["--train.grad_clip=nan"], "train.grad_clip=nan must be a finite number"),
    (["--kd.kd_weight=inf"], "must be finite numbers >= 0"),
    (["--config", "a.yaml", "--config=b.yaml"], "--config given twice (a.yaml, b.yaml)"),
])
def test_validate_prints_numbers(argv, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config(RunConfig, argv)


@pytest.mark.parametrize("schema", ["run", "harvest", "icldist"])
@pytest.mark.parametrize("key", ["max_restarts", "max_retries"])
def test_teacher_fault_budgets_are_validated(schema, key):
    """teacher.max_restarts / max_retries (Ray teacher actor faults) of every config that starts the
    service: defaults 3, 0 accepted, a negative value a one-line error naming the key."""
    from distill.icldist.config import ICLDistConfig
    from distill.knowdist.harvest import HarvestConfig

    cls = {"run": RunConfig, "harvest": HarvestConfig, "icldist": ICLDistConfig}[schema]
    assert getattr(load_config(cls, [])[0].teacher, key) == 3
    assert getattr(load_config(cls, [f"--teacher.{key}=0"])[0].teacher, key) == 0
    with pytest.raises(ConfigError, match=rf"^teacher\.{key}=-1 must be >= 0 \(0 = "):
        load_config(cls, [f"--teacher.{key}=-1"])


def _cfg(tmp_path, js: dict, **train):
    from distill.config import from_dict

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(js))
    return from_dict(RunConfig, {"deepspeed": {"config": str(p)}, "train": {"micro_batch": 4, "grad_accum": 2, **train}})


def test_ds_config_injection(tmp_path):
    import torch

    from distill.dist.ds_config import build_ds_config, teacher_ds_config

    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, grad_clip=0.5)
    ds = build_ds_config(cfg, world_size=2, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on CPU
    assert build_ds_config(cfg, world_size=1, on_gpu=True)["bf16"]["enabled"] is True  # bf16 on GPU
    t = teacher_ds_config(ds, torch.float32)
    assert t["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in t["zero_optimization"]
    assert "optimizer" not in t
    # The teacher's precision is its own (model.teacher_dtype), not the student's.
    bf16_student = build_ds_config(cfg, world_size=1, on_gpu=True)
    cases = ((torch.float32, (False, False)), (torch.bfloat16, (True, False)), (torch.float16, (False, True)))
    for dtype, flags in cases:  # flags: (bf16.enabled, fp16.enabled)
        for student in (ds, bf16_student):
            t = teacher_ds_config(student, dtype)
            assert (t["bf16"]["enabled"], t["fp16"]["enabled"]) == flags, (dtype, student["bf16"])


@pytest.mark.parametrize("js,needle", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu' = 8 conflicts with the run config's value 4"),
    ({"gradient_clipping": 5.0}, "gradient_clipping"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"optimizer": {"type": "AdamW"}}, "'optimizer' block is not allowed"),
])
def test_ds_config_conflicts_are_errors(tmp_path, js, needle):
    from distill.dist.ds_config import build_ds_config

    cfg = _cfg(tmp_path, js)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_ds_config(cfg, world_size=1, on_gpu=False)


def test_ds_config_zero_stage_conflict(tmp_path):
    from distill.config import from_dict
    from distill.dist.ds_config import build_ds_config

    p = tmp_path / "z2.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = from_dict(RunConfig, {"deepspeed": {"config": str(p), "zero_stage": 3}})
    with pytest.raises(ConfigError, match="zero_optimization.stage' = 2 conflicts"):
        build_ds_config(cfg, world_size=1, on_gpu=False)


def test_shipped_configs_load():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    from distill.dist.ds_config import build_ds_config

    for name in ("zero3.json", "zero3_offload.json", "zero2.json"):
        from distill.config import from_dict

        cfg = from_dict(RunConfig, {"deepspeed": {"config": str(repo / "ds_configs" / name)}})
        ds = build_ds_config(cfg, world_size=8, on_gpu=True)
        assert ds["zero_optimization"]["stage"] in (2, 3)
    from ..conftest import load_launcher

    mod = load_launcher("knowdist.py")
    ymls = sorted((repo / "launchers" / "configs").glob("*_knowdist.yaml"))
    assert len(ymls) >= 2
    for y in ymls:
        cfg, _ = load_config(mod.KnowDistConfig, ["--config", str(y)])
        assert cfg.model.teacher != "builtin" and cfg.model.student != "builtin"
        assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("kind", ["knowdist", "icldist"])
def test_every_shipped_config_trains_for_its_epochs(kind, capsys):
    """A shipped config that gives ``epochs`` trains epochs x examples / global batch steps, not the
    stage's built-in step count (all five KnowDist configs trained 60 steps with ``epochs: 3``)."""
    from pathlib import Path

    from distill.config import load_config

    repo = Path(__file__).resolve().parents[2]
    if kind == "knowdist":
        from distill.knowdist.stage import KnowDistConfig as cls
    else:
        from distill.icldist.stage import ICLDistConfig as cls
    ymls = sorted((repo / "launchers" / "configs").glob(f"*_{kind}.yaml"))
    assert len(ymls) >= 3
    for y in ymls:
        cfg, _ = load_config(cls, ["--config", str(y)])
        t = cfg.train
        assert t.epochs > 0 and t.steps == 0, f"{y.name}: steps={t.steps}, epochs={t.epochs}"
        n, world = 100_000, 8
        gb = t.micro_batch * t.grad_accum * world
        assert t.schedule_for(n, world) == (gb, n // gb, int(t.epochs * (n // gb))), y.name
        assert t.warmup_steps < t.schedule_for(n, world)[2], f"{y.name}: warm-up longer than the run"
    assert "both set" not in capsys.readouterr().err


def test_epochs_given_trains_by_epochs_and_steps_given_wins_in_one_line(capsys):
    from distill.config import load_config
    from distill.knowdist.stage import KnowDistConfig

    default, _ = load_config(KnowDistConfig, [])
    assert default.train.steps > 0  # the built-in run's own step count
    cfg, _ = load_config(KnowDistConfig, ["--train.epochs=2"])
    assert (cfg.train.steps, cfg.train.epochs) == (0, 2.0)
    assert capsys.readouterr().err == ""
    cfg, _ = load_config(KnowDistConfig, ["--train.epochs=2", "--train.steps=7"])
    assert (cfg.train.steps, cfg.train.epochs) == (7, 2.0)
    err = capsys.readouterr().err
    assert "train.steps=7 and train.epochs=2 are both set: steps wins" in err and err.count("\n") == 1


# -- registries, SentiBench tasks, --print-config: refused when the config is read, before any model --

@pytest.mark.parametrize("argv,msg", [
    # (a test that registers its own name before this one adds it to the lists: only their start is pinned)
    (["--data.name=sfft"], "data.name='sfft' is not a dataset; known: ["),
    (["--kd.teacher_backend=colocatd"], "kd.teacher_backend='colocatd' is not a teacher backend; known: ['cache', "
                                        "'colocated', "),
    # checked with or without teachers: a single-teacher run with a misspelt strategy used to run, ignoring it
    (["--multiteacher.weighting=metta"], "multiteacher.weighting='metta': one of ['fixed', 'route'"),
    (["--multiteacher.confidence.signal=entropy"], "multiteacher.confidence.signal='entropy': gold_prob | neg_entropy"),
    (["--multiteacher.meta.lr=0"], "multiteacher.meta.lr=0.0 must be > 0"),
    (["--eval.tasks=sc/sst2,sc/nope"], "eval.tasks='sc/sst2,sc/nope': unknown SentiBench task(s) ['sc/nope']; known: "
                                       "all, basic, multifaceted, fine-grained (categories) and sc/sst2"),
    (["--eval.tasks=,"], "eval.tasks is empty"),
    (["--print-config", "yaml"], "--print-config takes no value (got 'yaml')"),
    (["--print-config=x"], "--print-config takes no value (got 'x')"),
])
def test_names_are_checked_when_the_config_is_read(argv, msg):
    from distill.config import registered_names

    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, argv)
    assert msg in str(e.value)
    if "known: [" in msg:
        assert str(registered_names("datasets" if "data.name" in msg else "teacher_backends")) in str(e.value)


def test_registered_names_follow_the_registries():
    """The names validate() accepts are the registries' (built in, and a program's own registered
    before the check), and a stage's own names only where that stage passes them."""
    import re
    from pathlib import Path

    import distill
    from distill.data import registry as R
    from distill.teacher import registry as B
    from distill.config import BUILTIN_DATASETS, BUILTIN_TEACHER_BACKENDS, registered_names
    from distill.config import MULTITEACHER_BACKEND as BACKEND_NAME
    from distill.multiteacher.stage import ROUTED_DATASET

    # every name the package registers (decorators; the multi-teacher stage's setdefault; the teacher
    # registry's built-ins), ICLDist's own aside
    src = "".join(f.read_text() for f in Path(distill.__file__).parent.rglob("*.py"))
    found = {kind: set(re.findall(rf'register_{kind}\("([^"]+)"\)', src)) - {"icldist"}
             for kind in ("dataset", "teacher_backend")}
    assert found["dataset"] and B.LAZY_BACKENDS
    assert found["dataset"] | {ROUTED_DATASET} == set(BUILTIN_DATASETS)
    assert found["teacher_backend"] | set(B.LAZY_BACKENDS) | {BACKEND_NAME} == set(BUILTIN_TEACHER_BACKENDS)
    R.register_dataset("test_own_rows")(lambda cfg, tok, ctx: [])
    try:
        cfg, _ = load_config(RunConfig, ["--data.name=test_own_rows"])
        assert cfg.data.name == "test_own_rows"
    finally:
        R.DATASETS.pop("test_own_rows")
    assert "icldist" not in registered_names("teacher_backends")
    cfg = RunConfig()
    cfg.kd.teacher_backend = cfg.data.name = "icldist"
    cfg.validate(stage_names=("icldist",))
    with pytest.raises(ConfigError, match="kd.teacher_backend='icldist' is not a teacher backend"):
        cfg.validate()


def test_print_config_alone_still_prints(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(RunConfig, ["--print-config", "--train.lr=0.5", "--local_rank", "0"])
    assert e.value.code == 0 and "lr: 0.5" in capsys.readouterr().out


# -- what this machine cannot run: one line with what to use instead (RunConfig.check_machine) --------

@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("argv,msg", [
    (["--deepspeed.dist_backend=nccl"], "deepspeed.dist_backend=nccl needs CUDA GPUs and NCCL; this machine has no "
                                        "CUDA GPU: use deepspeed.dist_backend=gloo"),
    (["--model.attn=flash_attention_2"], "this machine has no CUDA GPU: use model.attn=sdpa"),
    (["--kd.impl=triton"], "this machine has no CUDA GPU and TRITON_INTERPRET is not 1: use kd.impl=torch"),
])
def test_machine_cannot_run(no_cuda, argv, msg):
    cfg, _ = load_config(RunConfig, argv)  # a config for GPUs still loads and validates on a CPU machine
    with pytest.raises(ConfigError) as e:
        cfg.check_machine()
    assert msg in str(e.value)


def test_machine_fp16_under_deepspeed_without_cuda(no_cuda):
    accel = pytest.importorskip("deepspeed.accelerator").get_accelerator()
    if accel.is_fp16_supported():
        pytest.skip("this CPU does fp16 in DeepSpeed: nothing to refuse")
    for argv, msg in ((["--model.dtype=float16"], "model.dtype=float16: DeepSpeed has no float16 on this machine"),
                      (["--model.teacher_dtype=fp16"], "model.teacher_dtype=fp16 (teacher.placement=auto): DeepSpeed "
                                                       "has no float16")):
        cfg, _ = load_config(RunConfig, ["--deepspeed.engine=deepspeed", *argv])
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            cfg.check_machine()


@pytest.mark.parametrize("argv", [
    ["--deepspeed.engine=deepspeed", "--model.dtype=bfloat16"],  # bf16 trains on CPU, in both engines
    ["--deepspeed.engine=torch", "--model.dtype=float16"],  # torch's CPU kernels run fp16
    ["--deepspeed.engine=deepspeed", "--model.teacher_dtype=float16", "--teacher.placement=replicated"],
    ["--deepspeed.dist_backend=gloo", "--model.attn=sdpa", "--kd.impl=torch"],
])
def test_machine_accepts_what_runs_on_cpu(no_cuda, argv):
    cfg, _ = load_config(RunConfig, argv)
    cfg.check_machine()


def test_machine_triton_interpreter(no_cuda, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    load_config(RunConfig, ["--kd.impl=triton"])[0].check_machine()


def test_vllm_settings_refused_in_one_line_where_vllm_is_missing_or_misset():
    """vLLM engines asked for where vLLM is not installed stop before anything loads; bad engine settings
    name their key. (In the main environment vLLM is absent: the vLLM paths are tested in tests/vllm.)"""
    import importlib.util

    from distill.config import ConfigError, RunConfig, load_config

    bad = {("--teacher.vllm.gpu_memory_utilization=1.5",): "teacher.vllm.gpu_memory_utilization=1.5 must be in (0, 1]",
           ("--kd.on_policy.sync_every=0",): "kd.on_policy.sync_every=0 must be >= 1",
           ("--kd.on_policy.engine=sglang",): "kd.on_policy.engine='sglang': hf | vllm",
           ("--teacher.placement=vllm", "--kd.topk=0"): "teacher.placement=vllm serves top-k only",
           ("--teacher.placement=vllm", "--kd.topk=8", "--kd.path=logits"): "set kd.path=lean",
           ("--teacher.placement=vllm", "--kd.topk=8", "--teacher.quantization=4bit"): "give vLLM a quantized checkpoint"}
    for argv, want in bad.items():
        with pytest.raises(ConfigError) as e:
            load_config(RunConfig, list(argv))[0].validate()
        assert want in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    if importlib.util.find_spec("vllm") is not None:
        return
    for argv, key in ((["--teacher.placement=vllm", "--kd.topk=8"], "teacher.placement=vllm"),
                      (["--kd.on_policy.fraction=0.5", "--kd.on_policy.engine=vllm"], "kd.on_policy.engine=vllm")):
        cfg = load_config(RunConfig, argv)[0]
        cfg.validate()
        with pytest.raises(ConfigError, match="vLLM is not installed") as e:
            cfg.check_machine()
        assert str(e.value).startswith(key) and "\n" not in str(e.value)
    from distill.knowdist.harvest import HarvestConfig

    with pytest.raises(ConfigError, match="takes neither teacher.quantization nor teacher.shards"):
        load_config(HarvestConfig, ["--teacher.engine=vllm", "--teacher.shards=2"])[0].validate()
