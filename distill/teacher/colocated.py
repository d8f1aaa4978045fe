"""The ``colocated`` teacher backend: the frozen teacher in this process, partitioned or replicated."""

from __future__ import annotations

import math

import torch

from distill.config import ConfigError, RunConfig
from distill.data.batching import model_inputs
from distill.teacher.base import BackendContext, TeacherBackend
from distill.losses.teacher_output import TopKTeacher


class ColocatedTeacher(TeacherBackend):
    """The frozen teacher in this process: full logits (or top-k when ``kd.topk`` > 0).

    ``ctx.teacher_placement`` (``teacher.placement``, resolved by the trainer): ``partitioned``, an
    inference-only DeepSpeed ZeRO-3 engine over the ranks (no optimizer, no gradients; every
    micro-batch gathers its layers); ``replicated``, a copy per rank, in ``model.teacher_dtype`` or
    bitsandbytes 8-bit / 4-bit weights (``teacher.quantization``). Forward under ``torch.no_grad()``.
    Its top-k comes from ``torch.topk`` over the real vocabulary: valid ids by construction.
    """

    topk_ids_checked = True

    def __init__(self, cfg: RunConfig, ctx: BackendContext):
        from distill.dist.engine import TeacherEngine
        from distill.models import load as ml

        on_gpu = ctx.device.type == "cuda"
        tdtype = cfg.model.teacher_dtype_name()
        zero3 = None
        if ctx.teacher_placement == "partitioned":
            if ctx.ds_config is None:
                raise ConfigError("teacher.placement=partitioned needs deepspeed.engine=deepspeed (the teacher is a "
                                  "ZeRO-3 inference engine); use teacher.placement=replicated")
            from distill.dist.ds_config import teacher_ds_config

            zero3 = teacher_ds_config(ctx.ds_config, ml.resolve_dtype(tdtype, on_gpu))
        elif ctx.teacher_placement != "replicated":
            raise ConfigError(f"the colocated teacher backend holds a partitioned or replicated teacher, not "
                              f"teacher.placement={ctx.teacher_placement}")
        self.placement = ctx.teacher_placement
        ml.check_teacher_tokenizer(ctx.teacher_path, ctx.tokenizer, student_name=ctx.student_path,
                                   trust_remote_code=cfg.model.trust_remote_code)
        model = ml.load_causal_lm(
            ctx.teacher_path, dtype=ml.resolve_dtype(tdtype, on_gpu), attn=ml.resolve_attn(cfg.model.attn, on_gpu),
            device=str(ctx.device), trust_remote_code=cfg.model.trust_remote_code, zero3_config=zero3,
            quantization=cfg.teacher.quantization, what="teacher folder (model.teacher)")
        ml.check_embedding_rows(model.config, ctx.vocab_size, f"teacher {ctx.teacher_path}")
        self.config = model.config
        self.softcap = None  # HF forwards apply final_logit_softcapping themselves
        self.engine = TeacherEngine(model, ds_config=zero3)
        self.topk = cfg.kd.topk
        self.temperature = cfg.kd.temperature
        self.vocab_size = ctx.vocab_size
        self.chunk_rows = cfg.kd.chunk_tokens or None
        self.scale, self.cap = ml.logit_transform(model)
        self._head_checked = False

    @torch.no_grad()
    def __call__(self, batch):
        if self.topk:
            return self.topk_on_supervised(batch)
        return self.engine.forward(**model_inputs(batch), use_cache=False).logits

    @torch.no_grad()
    def rows(self, batch, index):
        """``kd.path=lean``: the decoder's final hidden states at the flat positions ``index`` only;
        with ``kd.topk`` their TopKTeacher ``[N, k]`` (the head a chunk at a time), else a
        HiddenTeacher whose head the student's loss applies inside its own chunk loop. Neither the
        teacher's [tokens x V] logits nor fp32 copies of them exist."""
        from distill.losses.lean import HiddenTeacher

        hidden = self.engine.final_hidden(**model_inputs(batch), use_cache=False)
        self._check_head_once(batch, hidden)
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        if self.topk:
            return self._topk_of_rows(flat)
        return HiddenTeacher(flat, self.engine.output_head, self.scale, self.cap)

    @torch.no_grad()
    def topk_on_supervised(self, batch, ignore_index: int = -100):
        """``kd.path=logits`` with ``kd.topk``: TopKTeacher ``[B, L, k]`` computed only at the
        positions whose next token is supervised (the objective's shifted labels); other rows hold a
        filler (ids 0..k-1, uniform) that the objective masks out."""
        labels = batch["labels"]
        sup = torch.zeros_like(labels, dtype=torch.bool)
        sup[:, :-1] = labels[:, 1:] != ignore_index
        hidden = self.engine.final_hidden(**model_inputs(batch), use_cache=False)
        self._check_head_once(batch, hidden)
        t = self._topk_of_rows(hidden[sup])
        B, L = labels.shape
        k, dev = self.topk, hidden.device
        out_ids = torch.arange(k, dtype=torch.int32, device=dev).expand(B, L, k).clone()
        out_lp = torch.full((B, L, k), -math.log(k), dtype=torch.float32, device=dev)
        out_tail = torch.zeros((B, L), dtype=torch.float32, device=dev)
        out_ids[sup], out_lp[sup], out_tail[sup] = t.ids.to(torch.int32), t.logprobs, t.tail_mass
        return TopKTeacher(ids=out_ids, logprobs=out_lp, tail_mass=out_tail, temperature=self.temperature)

    def _topk_of_rows(self, rows: torch.Tensor) -> TopKTeacher:
        """TopKTeacher ``[N, k]`` of hidden ``rows [N, H]`` at the temperature of use over the
        tokenizer's real vocabulary; the lm_head runs on ``chunk`` rows at a time (about 32 MiB of
        fp32 logits), inside one gather of the head under ZeRO-3."""
        from distill.losses.divergences import default_chunk_tokens

        k, T, vocab = self.topk, self.temperature, self.vocab_size
        chunk = self.chunk_rows or default_chunk_tokens(vocab)
        parts = []
        with self.engine.output_head() as (weight, bias):
            for i in range(0, rows.shape[0], chunk):
                parts.append(TopKTeacher.from_logits(self._logits(rows[i:i + chunk], weight, bias), k, temperature=T,
                                                     vocab_size=vocab))
        if not parts:
            empty = rows.new_zeros((0, k))
            return TopKTeacher(ids=empty.to(torch.int32), logprobs=empty.float(), tail_mass=rows.new_zeros(0).float(),
                               temperature=T)
        return TopKTeacher(ids=torch.cat([p.ids for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
                           tail_mass=torch.cat([p.tail_mass for p in parts]), temperature=T)

    def _check_head_once(self, batch, hidden) -> None:
        """Once: the model's own forward at the last position equals lm_head(final hidden) as
        computed here (scale, softcap), so an architecture that post-processes its logits differently
        is refused, not mis-distilled."""
        if self._head_checked:
            return
        own = self.engine.forward(**model_inputs(batch), use_cache=False, logits_to_keep=1).logits[:, -1].float()
        with self.engine.output_head() as (weight, bias):
            self._check_head(own, hidden, weight, bias)

    def _logits(self, h, weight, bias):
        x = torch.nn.functional.linear(h, weight, bias)
        if self.scale != 1.0:
            x = x * self.scale
        if self.cap is not None:
            x = torch.tanh(x / self.cap) * self.cap
        return x

    def _check_head(self, own, hidden, weight, bias) -> None:
        """Once: the model's own forward (``own``: last position only) equals lm_head(final hidden) as
        computed here, so an architecture that post-processes its logits differently is refused, not
        mis-distilled."""
        mine = self._logits(hidden[:, -1], weight, bias).float()
        tol = 1e-3 if weight.dtype == torch.float32 else 5e-2
        err = float((own - mine).abs().max())
        if err > tol * max(1.0, float(own.abs().max())):
            raise RuntimeError(
                f"teacher {type(self.engine.module).__name__}: its logits differ from lm_head(final hidden) "
                f"(max |diff| {err:.3g}); the chunked teacher head cannot reproduce this architecture's "
                f"head: use kd.topk=0 and kd.path=logits (full logits of the model's own forward)")
        self._head_checked = True
