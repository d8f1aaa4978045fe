"""The memory and traffic model of teacher placement: shapes in, per-GPU bytes out. The run builder's
``teacher.placement=auto`` (:func:`auto_placement`) and ``python -m distill.dist.plan`` (the command line,
distill/dist/plan.py) use it.

Reads the two models' shapes (a folder with ``config.json``, or a hub name from ``PUBLISHED`` below:
there is no hub access here, so the published configs are built in; no weights are read) and, for
each teacher placement x student ZeRO stage, prints the per-GPU memory, whether it fits
``--gpu-mem``, the collective traffic per optimizer step and the part of it that crosses nodes,
then recommends one placement. Units: GB = 1e9 bytes.

Placements:
  partitioned  the teacher is a ZeRO-3 inference engine over all GPUs (``teacher.placement=partitioned``)
  replicated   a full teacher copy on every GPU (bf16, or int8 / int4 through bitsandbytes)
  ray          the teacher on its own GPUs as pipeline shards (``distill.teacher.ray_service``
               layout, one GPU per shard, the fewest shards that fit), serving top-k; the other GPUs
               train the student

Computed (exact from the shapes): parameter counts; bytes of weights, optimizer states, the fp32
head-gradient accumulator and the logits chunk; collective bytes. Estimated (a model, not a
measurement): activations, the inference working set, the fixed reserve; docs/scaling.md has the
formulas. The planner models memory and communication only, not compute time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from distill.errors import UserError

GB = 1e9
BF16 = 2

# Bytes per parameter of a quantized nn.Linear weight (bitsandbytes; embeddings, norms, biases and
# lm_head stay bf16: bitsandbytes only replaces nn.Linear and skips lm_head by default).
# int8 (LLM.int8): 1 byte + per-row fp32 scales + an allowance of ~6% for the fp16 outlier columns
# (threshold 6.0) and rounding; int4 (NF4, no double quantization): 0.5 byte + one fp32 absmax per
# block of 64 = 0.5 + 4/64.
QUANT_BYTES = {"bf16": 2.0, "int8": 1.06, "int4": 0.5625}

# ZeRO paper (Rajbhandari et al. 2020), mixed-precision AdamW: 2 (bf16 weights) + 2 (bf16 grads)
# + 12 (fp32 master weights, momentum, variance) bytes per parameter.
W_BYTES, G_BYTES, OPT_BYTES = 2, 2, 12

TOPK_BYTES_PER_ID = 4 + 4  # int32 id + fp32 log-prob (TopKTeacher), per kept id
TOKEN_ID_BYTES = 8  # int64 input ids sent to the teacher service

# Chunk tensors of [rows x V] fp32 alive at once in the lean step (distill/losses/divergences.py,
# DEFAULT_CHUNK_BYTES comment): ~5 with a full-distribution teacher, ~3 with a top-k teacher.
CHUNK_TENSORS_FULL, CHUNK_TENSORS_TOPK = 5, 3


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The shape of a Llama/Qwen2-style decoder (RMSNorm, GQA attention, SwiGLU MLP)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # lm_head shares the input embedding
    head_dim: int
    qkv_bias: bool  # biases on q/k/v projections (Qwen2)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def attn_linear(self) -> int:
        q = self.heads * self.head_dim
        return self.hidden * q + 2 * self.hidden * self.kv_dim + q * self.hidden

    def mlp_linear(self) -> int:
        return 3 * self.hidden * self.intermediate  # gate, up, down

    def layer_small(self) -> int:
        """Per-layer parameters outside the nn.Linear weights: 2 RMSNorm weights + q/k/v biases."""
        return 2 * self.hidden + ((self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0)

    def layer_params(self) -> int:
        return self.attn_linear() + self.mlp_linear() + self.layer_small()

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """lm_head parameters not shared with the embedding (0 when tied)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embed_params() + self.layers * self.layer_params() + self.hidden + self.head_params()

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' nn.Linear weights (what bitsandbytes quantizes)."""
        return self.layers * (self.attn_linear() + self.mlp_linear())

    def weight_bytes(self, dtype: str = "bf16") -> float:
        return self.linear_params * QUANT_BYTES[dtype] + (self.params - self.linear_params) * BF16


def _s(name, hidden, inter, layers, heads, kv, vocab, tied, head_dim=None, qkv_bias=False) -> Shape:
    return Shape(name, hidden, inter, layers, heads, kv, vocab, tied, head_dim or hidden // heads, qkv_bias)


def _published() -> dict[str, Shape]:
    """Published config.json shapes (huggingface.co/<name>/blob/main/config.json); base and
    -Instruct share the shape."""
    table = [
        ("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True),
        ("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True),
        ("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True),
        ("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False),
        ("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False),
        ("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False),
        ("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False),
        ("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True),
        ("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True),
        ("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False),
        ("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False),
    ]
    out: dict[str, Shape] = {}
    for name, *dims in table:
        for n in (name, name + "-Instruct"):
            out[n] = _s(n, *dims, qkv_bias=name.startswith("Qwen/"))
    # Same shapes under the other published names.
    for alias, src in (("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
                       ("meta-llama/Meta-Llama-3.1-70B", "meta-llama/Llama-3.1-70B")):
        for suffix in ("", "-Instruct"):
            out[alias + suffix] = _s(alias + suffix, *_dims(out[src + suffix]))
    out["meta-llama/Llama-3.3-70B-Instruct"] = _s("meta-llama/Llama-3.3-70B-Instruct", *_dims(out["meta-llama/Llama-3.1-70B"]))
    return out


def _dims(s: Shape) -> tuple:
    return (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.vocab, s.tied, s.head_dim, s.qkv_bias)


PUBLISHED = _published()


class PlanError(UserError, ValueError):
    """A user error of the planner (unknown model, bad flag); printed as one line."""


def _from_config(name: str, cfg) -> Shape:
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    text = get("text_config")  # multimodal wrappers keep the decoder under text_config
    if text is not None:
        cfg = text
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    try:
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        shape = Shape(
            name=name, hidden=hidden, intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")), heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads), vocab=int(get("vocab_size")),
            # PretrainedConfig's default is tied; Llama/Qwen2 configs set it explicitly.
            tied=bool(get("tie_word_embeddings", True)),
            head_dim=int(get("head_dim") or hidden // heads),
            # Qwen2 has q/k/v biases without a config key; Llama-style configs say attention_bias.
            qkv_bias=bool(get("attention_bias", get("model_type") == "qwen2")),
        )
    except (TypeError, ValueError) as e:
        raise PlanError(f"{name}: config.json lacks a decoder shape key ({e}); need hidden_size, intermediate_size, "
                        f"num_hidden_layers, num_attention_heads, vocab_size") from None
    return shape


def load_shape(name_or_path: str) -> Shape:
    """A folder with config.json (read through transformers.AutoConfig, plain JSON if it does not
    know the model type), else a name of ``PUBLISHED``."""
    p = Path(name_or_path)
    if (p / "config.json").is_file():
        try:
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(str(p))
        except (ImportError, ValueError, KeyError, OSError):
            try:
                cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise PlanError(f"{p / 'config.json'}: not readable as JSON ({e})") from None
        return _from_config(str(p), cfg)
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    lower = {k.lower(): v for k, v in PUBLISHED.items()}
    if name_or_path.lower() in lower:
        return lower[name_or_path.lower()]
    try:  # a hub name in the local HF cache (or reachable hub): its config.json only
        from transformers import AutoConfig

        return _from_config(name_or_path, AutoConfig.from_pretrained(name_or_path))
    except (ImportError, ValueError, KeyError, OSError):
        pass
    raise PlanError(f"unknown model {name_or_path!r}: not a folder with config.json and not a built-in shape; "
                    f"known: {', '.join(PUBLISHED)}")


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def student_states(s: Shape, stage: int, n: int) -> float:
    """Bytes per GPU of weights + grads + AdamW states at ZeRO ``stage`` over ``n`` ranks (ZeRO paper)."""
    p = s.params
    if stage == 0:
        return p * (W_BYTES + G_BYTES + OPT_BYTES)
    if stage == 1:
        return p * (W_BYTES + G_BYTES) + p * OPT_BYTES / n
    if stage == 2:
        return p * W_BYTES + p * (G_BYTES + OPT_BYTES) / n
    return p * (W_BYTES + G_BYTES + OPT_BYTES) / n


def train_activations(s: Shape, tokens: int, seq: int, micro: int, ckpt: bool, attn: str) -> float:
    """Estimated bytes the student keeps for backward (bf16, no dropout), after Korthikanti et al.
    2022 redone for RMSNorm + GQA + SwiGLU. Per layer ``tokens x (12h + 4*kv_dim + 8i)``: two norm
    inputs (4h), the q-proj input, q and attention output (6h), k and v (4*kv_dim), the MLP input
    (2h), gate, up, silu(gate) and their product (8i); eager attention adds ``6 * heads * seq^2 *
    micro`` (fp32 softmax output + bf16 probabilities). With checkpointing only each layer's input
    (2h) stays, plus one layer recomputed in backward."""
    per_layer = tokens * (12 * s.hidden + 4 * s.kv_dim + 8 * s.intermediate)
    if attn == "eager":
        per_layer += 6 * s.heads * seq * seq * micro
    final = tokens * 2 * s.hidden * 2  # final norm input + the hidden states into the lean head
    if ckpt:
        return s.layers * tokens * 2 * s.hidden + per_layer + final
    return s.layers * per_layer + final


def infer_working_set(s: Shape, tokens: int) -> float:
    """Estimated transient bytes of a no-grad forward: one layer's intermediates alive at a time
    (hidden, normed input, q, attention out: 4h; k, v; gate, up, product: 3i), bf16, plus the final
    hidden states kept for the loss."""
    return tokens * BF16 * (4 * s.hidden + 2 * s.kv_dim + 3 * s.intermediate) + tokens * BF16 * s.hidden


def chunk_rows(vocab: int) -> int:
    from distill.losses.divergences import default_chunk_tokens  # the loss's own chunking rule
    return default_chunk_tokens(vocab)


def head_working_set(s: Shape, full_teacher: bool) -> tuple[float, float]:
    """(fp32 [V x H] head-gradient accumulator, the chunk's fp32 [rows x V] tensors) in bytes."""
    acc = s.vocab * s.hidden * 4
    chunk = chunk_rows(s.vocab) * s.vocab * 4 * (CHUNK_TENSORS_FULL if full_teacher else CHUNK_TENSORS_TOPK)
    return acc, chunk


def largest_gather(s: Shape) -> int:
    """Parameters gathered at once under ZeRO-3: a decoder layer or the (tied) head, whichever is larger."""
    return max(s.layer_params(), s.vocab * s.hidden)


def ray_shards(t: Shape, dtype: str, mem: float, batch_tokens: int, max_shards: int) -> tuple[int, float] | None:
    """The fewest pipeline shards (one GPU each) whose largest shard fits ``mem`` bytes, and that
    shard's bytes; None if no count up to ``max_shards`` fits."""
    from distill.teacher.shard import split_layers  # the service's own split
    per_layer_bytes = (t.attn_linear() + t.mlp_linear()) * QUANT_BYTES[dtype] + t.layer_small() * BF16
    head_bytes = t.vocab * t.hidden * BF16
    for n in range(1, min(max_shards, t.layers) + 1):
        worst = 0.0
        for i, (a, b) in enumerate(split_layers(t.layers, n)):
            w = (b - a) * per_layer_bytes
            if i == 0:
                w += t.embed_params() * BF16
            if i == n - 1:
                # final norm + lm_head (a tied head is a second copy of the embedding on this stage) + the top-k chunk
                w += t.hidden * BF16 + head_bytes + chunk_rows(t.vocab) * t.vocab * 4 * CHUNK_TENSORS_TOPK
            worst = max(worst, w + infer_working_set(t, batch_tokens))
        if worst <= mem:
            return n, worst
    return None


# ----------------------------------------------------------------------------------------------
# Traffic: a flat ring per collective
# ----------------------------------------------------------------------------------------------


def ring_bytes(size: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather or reduce-scatter of ``size`` bytes over ``n`` ranks."""
    return size * (n - 1) / n if n > 1 else 0.0


def ring_internode(size: float, n: int, nodes: int) -> float:
    """Bytes crossing node boundaries, all links together, for one all-gather / reduce-scatter of
    ``size`` bytes over ``n`` ranks on ``nodes`` nodes: the ring, ordered by node, crosses ``nodes``
    node boundaries and every ring link carries ``size * (n-1)/n``."""
    return nodes * ring_bytes(size, n) if nodes > 1 else 0.0


def nodes_of(ranks: range, gpn: int) -> int:
    return len({r // gpn for r in ranks})


def student_traffic(s: Shape, stage: int, n: int, nodes: int, accum: int) -> tuple[float, float]:
    """(per-GPU bytes, inter-node bytes) of the student's collectives per optimizer step (bf16):
    stage 0 all-reduce of grads at the boundary (= 2 ring passes); stage 1 reduce-scatter of grads
    at the boundary + all-gather of the updated weights; stage 2 reduce-scatter every micro-batch +
    the weight all-gather; stage 3 per micro-batch forward all-gather, backward all-gather and
    gradient reduce-scatter."""
    size = s.params * BF16
    passes = {0: 2, 1: 2, 2: accum + 1, 3: 3 * accum}[stage]
    return passes * ring_bytes(size, n), passes * ring_internode(size, n, nodes)


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    placement: str
    stage: int
    student_gpus: int
    teacher_gpus: int  # GPUs only for the teacher (ray), else 0
    student_states: float  # computed
    teacher_weights: float  # computed (per student GPU)
    gathered: float  # computed: ZeRO-3 gathered weights (largest layer or head, teacher and/or student)
    head_acc: float  # computed: fp32 [V x H] accumulator
    head_chunk: float  # computed: fp32 chunk tensors
    activations: float  # estimate, no checkpointing
    activations_ckpt: float  # estimate, gradient checkpointing
    teacher_act: float  # estimate: teacher forward working set on a student GPU
    reserve: float  # allowance
    total: float
    total_ckpt: float
    fits: str  # yes | ckpt (only with gradient checkpointing) | no | n/a
    comm_gpu: float  # computed: bytes a student GPU sends per optimizer step
    internode: float  # computed: bytes over inter-node links per optimizer step, all links
    flops_gpu: float = 0.0  # estimate: FLOPs per optimizer step on the busiest GPU (2P/token forward, 6P/token train)
    teacher_shard_mem: float = 0.0  # ray: the largest shard's bytes (weights computed + working set estimate)
    note: str = ""


def _na(placement: str, stage: int, note: str) -> Row:
    zero = {f.name: 0.0 for f in fields(Row) if f.type == "float"}
    return Row(placement=placement, stage=stage, student_gpus=0, teacher_gpus=0, fits="n/a", note=note, **zero)


def plan(teacher: Shape, student: Shape, *, gpus: int, gpu_mem: float, gpus_per_node: int = 8, seq: int = 4096,
         micro_batch: int = 1, grad_accum: int = 1, teacher_dtype: str = "bf16", attn: str = "flash",
         topk: int = 64, teacher_batch_tokens: int = 16384, reserve: float = 6.0) -> dict:
    """Every placement x stage row and the recommendation, as one JSON-ready dict (bytes, not GB)."""
    _check_setup(gpus=gpus, gpu_mem=gpu_mem, gpus_per_node=gpus_per_node, seq=seq, micro_batch=micro_batch,
                 grad_accum=grad_accum, teacher_dtype=teacher_dtype, topk=topk,
                 teacher_batch_tokens=teacher_batch_tokens, reserve=reserve)
    p = _Planner(teacher, student, gpus=gpus, gpu_mem=gpu_mem, gpus_per_node=gpus_per_node, seq=seq,
                 micro_batch=micro_batch, grad_accum=grad_accum, teacher_dtype=teacher_dtype, attn=attn, topk=topk,
                 teacher_batch_tokens=teacher_batch_tokens, reserve=reserve)
    p.partitioned_rows()
    p.replicated_rows()
    p.ray_rows()
    rec = recommend(p.rows)
    return {
        "teacher": {**asdict(teacher), "params": teacher.params, "weight_bytes": teacher.weight_bytes(teacher_dtype),
                    "dtype": teacher_dtype},
        "student": {**asdict(student), "params": student.params, "weight_bytes": student.weight_bytes("bf16")},
        "setup": {"gpus": gpus, "gpus_per_node": p.gpn, "nodes": p.nodes, "gpu_mem_gb": gpu_mem, "seq": seq,
                  "micro_batch": micro_batch, "grad_accum": grad_accum, "attn": attn, "topk": topk,
                  "teacher_batch_tokens": teacher_batch_tokens, "reserve_gb": reserve},
        "rows": [asdict(r) for r in p.rows],
        "recommendation": rec,
    }


def _check_setup(*, gpus, gpu_mem, gpus_per_node, seq, micro_batch, grad_accum, teacher_dtype, topk,
                 teacher_batch_tokens, reserve) -> None:
    """One :class:`PlanError` line naming the flag of the first setting out of range."""
    if gpus < 1 or gpus_per_node < 1 or seq < 1 or micro_batch < 1 or grad_accum < 1:
        raise PlanError(f"--gpus {gpus}, --gpus-per-node {gpus_per_node}, --seq {seq}, --micro-batch {micro_batch}, "
                        f"--grad-accum {grad_accum} must all be >= 1")
    if teacher_dtype not in QUANT_BYTES:
        raise PlanError(f"--teacher-dtype {teacher_dtype!r}: one of {', '.join(QUANT_BYTES)}")
    if not (math.isfinite(gpu_mem) and gpu_mem > 0):
        raise PlanError(f"--gpu-mem {gpu_mem}: the memory of one GPU in GB must be a number > 0 (e.g. 80)")
    if not (math.isfinite(reserve) and 0 <= reserve < gpu_mem):
        raise PlanError(f"--reserve {reserve}: the GB held back per GPU must be a number >= 0 and below --gpu-mem "
                        f"{gpu_mem:g}")
    if topk < 1 or teacher_batch_tokens < 1:
        raise PlanError(f"--topk {topk} and --teacher-batch-tokens {teacher_batch_tokens} must be >= 1")


class _Planner:
    """The rows of one (checked) setup: each placement adds its four ZeRO-stage rows to ``rows``."""

    def __init__(self, teacher: Shape, student: Shape, *, gpus: int, gpu_mem: float, gpus_per_node: int, seq: int,
                 micro_batch: int, grad_accum: int, teacher_dtype: str, attn: str, topk: int,
                 teacher_batch_tokens: int, reserve: float):
        self.teacher, self.student, self.gpus, self.grad_accum = teacher, student, gpus, grad_accum
        self.teacher_dtype, self.topk, self.teacher_batch_tokens = teacher_dtype, topk, teacher_batch_tokens
        self.mem, self.res = gpu_mem * GB, reserve * GB
        self.tokens = seq * micro_batch
        self.gpn = min(gpus_per_node, gpus)
        self.nodes = math.ceil(gpus / self.gpn)
        self.act = train_activations(student, self.tokens, seq, micro_batch, False, attn)
        self.act_ck = train_activations(student, self.tokens, seq, micro_batch, True, attn)
        self.rows: list[Row] = []

    def add(self, placement, stage, n, t_gpus, t_weights, t_gather, t_act, full_teacher, comm_extra, inter_extra,
            note="", shard_mem=0.0) -> None:
        """One row: the student on ``n`` GPUs at ZeRO ``stage`` plus the placement's teacher terms."""
        teacher, student, grad_accum, tokens = self.teacher, self.student, self.grad_accum, self.tokens
        stu_flops = grad_accum * tokens * 6 * student.params
        if t_gpus:  # ray: the pipeline shards share the teacher forward of all n student ranks
            flops = max(stu_flops, grad_accum * tokens * n * 2 * teacher.params / t_gpus)
        else:
            flops = stu_flops + grad_accum * tokens * 2 * teacher.params
        states = student_states(student, stage, n)
        gathered = t_gather + (largest_gather(student) * BF16 if stage == 3 and n > 1 else 0.0)
        acc, chunk = head_working_set(student, full_teacher)
        base = states + t_weights + gathered + acc + chunk + t_act + self.res
        total, total_ck = base + self.act, base + self.act_ck
        fits = "yes" if total <= self.mem else "ckpt" if total_ck <= self.mem else "no"
        s_comm, s_inter = student_traffic(student, stage, n, nodes_of(range(n), self.gpn), grad_accum)
        self.rows.append(Row(placement, stage, n, t_gpus, states, t_weights, gathered, acc, chunk, self.act,
                             self.act_ck, t_act, self.res, total, total_ck, fits, s_comm + comm_extra,
                             s_inter + inter_extra, flops, shard_mem, note))

    def partitioned_rows(self) -> None:
        """ZeRO-3 inference engine over all GPUs; every micro-batch gathers the whole teacher."""
        teacher, gpus, grad_accum = self.teacher, self.gpus, self.grad_accum
        t_bf16 = teacher.weight_bytes("bf16")
        for stage in range(4):
            if self.teacher_dtype != "bf16":
                self.rows.append(_na("partitioned", stage, "ZeRO-3 partitions float weights; no int8/int4"))
                continue
            self.add("partitioned", stage, gpus, 0, t_bf16 / gpus, largest_gather(teacher) * BF16 if gpus > 1 else 0.0,
                     infer_working_set(teacher, self.tokens), True,
                     grad_accum * ring_bytes(t_bf16, gpus), grad_accum * ring_internode(t_bf16, gpus, self.nodes))

    def replicated_rows(self) -> None:
        """A full copy per GPU, no teacher traffic."""
        for stage in range(4):
            self.add("replicated", stage, self.gpus, 0, self.teacher.weight_bytes(self.teacher_dtype), 0.0,
                     infer_working_set(self.teacher, self.tokens), True, 0.0, 0.0)

    def ray_rows(self) -> None:
        """The fewest pipeline shards that fit, on the last GPUs; the rest train the student."""
        teacher, gpus, gpn, tokens, topk = self.teacher, self.gpus, self.gpn, self.tokens, self.topk
        found = (ray_shards(teacher, self.teacher_dtype, self.mem - self.res, self.teacher_batch_tokens, gpus - 1)
                 if gpus > 1 else None)
        for stage in range(4):
            if found is None:
                why = "needs >= 2 GPUs" if gpus < 2 else f"the teacher does not fit {gpus - 1} shard GPUs"
                self.rows.append(_na("ray", stage, why))
                continue
            t_n, shard_mem = found
            n = gpus - t_n
            t_ranks = range(n, gpus)
            # per micro-batch of every student rank: ids in, hidden states across each stage boundary, top-k back
            hops = sum(1 for r in t_ranks[:-1] if r // gpn != (r + 1) // gpn)
            first_node, last_node = t_ranks[0] // gpn, t_ranks[-1] // gpn
            ids_b, hid_b, topk_b = tokens * TOKEN_ID_BYTES, tokens * teacher.hidden * BF16, tokens * (topk * TOPK_BYTES_PER_ID + 4)
            remote_in = sum(1 for r in range(n) if r // gpn != first_node)
            remote_out = sum(1 for r in range(n) if r // gpn != last_node)
            inter = self.grad_accum * (remote_in * ids_b + n * hops * hid_b + remote_out * topk_b)
            self.add("ray", stage, n, t_n, 0.0, 0.0, 0.0, False, self.grad_accum * (ids_b + topk_b), inter,
                     note=f"teacher: {t_n} pipeline shard GPU(s), top-{topk}", shard_mem=shard_mem)


def recommend(rows: list[Row]) -> dict | None:
    """Among the fitting rows whose busiest GPU does at most 1.1x the least compute per step (an
    unbalanced split, e.g. a Ray teacher on too few GPUs, idles the rest), the one with the least
    inter-node traffic; ties: no checkpointing needed, then the least per-GPU traffic, then the
    least memory."""
    ok = [r for r in rows if r.fits in ("yes", "ckpt")]
    if not ok:
        return None
    least = min(ok, key=lambda r: r.flops_gpu)
    balanced = [r for r in ok if r.flops_gpu <= 1.1 * least.flops_gpu]
    best = min(balanced, key=lambda r: (round(r.internode / GB, 3), r.fits != "yes", round(r.comm_gpu / GB, 3),
                                        r.total if r.fits == "yes" else r.total_ckpt))
    ties = [r for r in balanced if round(r.internode / GB, 3) == round(best.internode / GB, 3)]
    nxt = min((r.internode for r in balanced if round(r.internode / GB, 3) > round(best.internode / GB, 3)), default=None)
    why = (f"least inter-node traffic ({best.internode / GB:.1f} GB/step"
           + (f"; next {nxt / GB:.1f} GB" if nxt is not None else "")
           + f") of the {len(balanced)} fitting options within 1.1x of the least compute on the busiest GPU")
    if len(ties) > 1:
        why += f"; of the {len(ties)} tied, no checkpointing, the least per-GPU traffic, then the least memory"
    if best.fits == "ckpt":
        why += "; needs gradient checkpointing"
    skipped = [r for r in ok if r not in balanced and r.internode < best.internode]
    caution = ""
    if skipped:
        r = min(skipped, key=lambda r: r.internode)
        caution = (f"{r.placement} ZeRO-{r.stage} moves less over the network ({r.internode / GB:.1f} GB/step) but its "
                   f"busiest GPU does {r.flops_gpu / least.flops_gpu:.1f}x the compute"
                   + (f" (the teacher forward of {r.student_gpus} ranks on {r.teacher_gpus} GPUs)"
                      if r.placement == "ray" else ""))
    return {"placement": best.placement, "stage": best.stage, "why": why, "caution": caution,
            "overrides": overrides(best)}


# The DeepSpeed JSON shipped for each ZeRO stage (ds_configs/, from the repository root).
DS_CONFIG_FILES = {0: "ds_configs/zero0.json", 1: "ds_configs/zero1.json", 2: "ds_configs/zero2.json",
                   3: "ds_configs/zero3.json"}


def overrides(r: Row) -> str:
    """The launcher flags that realise row ``r`` (placement, ZeRO stage through its shipped JSON,
    checkpointing where only that fits, the Ray teacher's GPUs)."""
    flags = [f"--teacher.placement={r.placement}", f"--deepspeed.config={DS_CONFIG_FILES[r.stage]}"]
    if r.fits == "ckpt":
        flags.append("--model.grad_checkpointing=true")
    if r.placement == "ray":
        flags.append(f"--teacher.shards={r.teacher_gpus}")
    return " ".join(flags)


# Stated assumptions of the seconds-per-step estimate (override with the flags of the same names).
DEFAULT_INTRA_GBPS = 150.0  # GB/s a GPU sends within a node (NVLink-class; PCIe is ~25)
DEFAULT_INTER_GBPS = 25.0  # GB/s per node over the network (200 Gb/s InfiniBand/RoCE)
DEFAULT_TFLOPS = 300.0  # dense bf16 TFLOP/s a GPU sustains on these matmuls (about 40% of an H100's peak)


def step_seconds(r: dict, nodes: int, *, intra_gbps: float, inter_gbps: float, tflops: float) -> float:
    """Estimate [e] of one optimizer step: the busiest GPU's compute at ``tflops``, plus its traffic at
    ``intra_gbps`` and the inter-node bytes spread over the nodes' links at ``inter_gbps`` each, added
    (no overlap of compute and communication assumed)."""
    return (r["flops_gpu"] / (tflops * 1e12) + r["comm_gpu"] / (intra_gbps * GB)
            + r["internode"] / (max(1, nodes) * inter_gbps * GB))


def rank_memory(device, local_ranks: int) -> float:
    """Bytes one training rank may plan with: its own GPU's total on CUDA (one GPU per rank, however
    many ranks share the node), this host's RAM split between its ``local_ranks`` on CPU."""
    if device.type == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(1, local_ranks)


def auto_placement(teacher: Shape, student: Shape, *, world: int, gpus_per_node: int, stage: int, gpu_mem: float,
                   seq: int, micro_batch: int, grad_accum: int, quantization: str, topk: int,
                   partitioned_ok: bool) -> tuple[str, str]:
    """``teacher.placement=auto`` in the trainer: ``(placement, why)`` for a launched job of ``world``
    training ranks at ZeRO ``stage`` (``gpu_mem`` GB each). Candidates: ``replicated`` (in the
    run's quantization) and, where ``partitioned_ok`` (the DeepSpeed engine, a float teacher),
    ``partitioned``. ``ray`` is never chosen here: its GPUs lie outside the launched job (set it
    explicitly; ``python -m distill.dist.plan`` sizes it). Among the rows that fit, :func:`recommend`
    decides; when none fits, the one needing the least memory, said so."""
    dtype = {"": "bf16", "8bit": "int8", "4bit": "int4"}[quantization]
    p = plan(teacher, student, gpus=world, gpu_mem=gpu_mem, gpus_per_node=gpus_per_node, seq=seq,
             micro_batch=micro_batch, grad_accum=grad_accum, teacher_dtype=dtype, topk=topk or 64)
    allowed = ("replicated", "partitioned") if partitioned_ok and dtype == "bf16" else ("replicated",)
    rows = [Row(**r) for r in p["rows"] if r["stage"] == stage and r["placement"] in allowed]
    own = next(r.comm_gpu for r in rows if r.placement == "replicated")  # the student's traffic alone
    sizes = ", ".join(f"{r.placement} {r.total / GB:.1f} GB/GPU ({r.fits}), teacher traffic "
                      f"{(r.comm_gpu - own) / GB:.2f} GB/step" for r in rows)
    rec = recommend(rows)
    if rec is None:
        best = min(rows, key=lambda r: r.total_ckpt)
        return best.placement, (f"nothing fits {gpu_mem:.0f} GB per GPU by the memory model ({sizes}); "
                                f"{best.placement} needs the least; consider teacher.quantization or "
                                f"teacher.placement=ray")
    return rec["placement"], f"{rec['why']} [{sizes}; estimates: python -m distill.dist.plan]"


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
