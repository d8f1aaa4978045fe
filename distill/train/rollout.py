"""On-policy rollouts (``kd.on_policy``): the live student writes the responses of a share of each
optimizer step's examples before the step trains on them.

Which examples: ``round(fraction * global_batch)`` positions of the step's global batch (at least one
when ``fraction > 0``), drawn from a generator seeded by ``train.seed`` and the step, so every rank
knows the step's choice without talking to the others and a resumed run makes the same one. Each
chosen example keeps its prompt (the tokens before its first supervised label) and gets the
student's sampled response in place of the teacher's, from a generator seeded by ``train.seed``, the
step and the example's index in the dataset: the same tokens whatever the world size, and again after
a resume. Generated rows are marked ``on_policy`` in the batch: the loop trains them on the
divergence to the teacher alone (no CE on the student's own text, distill.losses), and they count in
the step's normaliser like every supervised row.

Generation runs once per step, at its start (after the previous optimizer step), through one of two
samplers (``kd.on_policy.engine``):

* ``hf`` (:class:`StudentSampler`): the live student, for all this rank's chosen examples, in batches
  of ``batch_size``, inside the engine's ``generation()`` block (under ZeRO-3 the weights are gathered
  once for the whole block; every rank enters it, also one with nothing to write). Always the newest
  weights.
* ``vllm`` (:class:`VLLMSampler`): each rank holds a vLLM engine with a copy of the student and
  writes its own chosen examples. The copies' weights are refreshed from the student at the first
  step and then every ``sync_every`` optimizer steps (at steps that are a multiple of it; every rank
  enters, under ZeRO-3 the weights are gathered for it), so a sample can come from weights up to
  ``sync_every - 1`` updates old. A resumed run copies at its first step. vLLM draws its own random
  numbers: seeded per example as above, but not the tokens the ``hf`` sampler draws.

Logged per step: ``gen_tokens`` and ``gen_seqs`` (all ranks), ``gen_mean_len`` and ``gen_time_s``
(this rank's seconds), and with vLLM ``gen_sync_s`` (the last weight copy's seconds, 0 without one).
"""

from __future__ import annotations

import hashlib
import time

import torch

from distill.models.generate import sample_responses
from distill.train.callbacks import Callback

IGNORE_INDEX = -100


def example_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of dataset example ``index`` at optimizer step ``step`` (63 bits)."""
    digest = hashlib.sha256(f"on-policy:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StudentSampler:
    """``kd.on_policy.engine=hf``: the live student samples, in batches of ``batch_size``, inside the
    training engine's ``generation()`` block (see the module docstring)."""

    sync_s = None

    def __init__(self, engine, *, batch_size: int, temperature: float, top_p: float, eos_ids, pad_id: int, device):
        self.engine, self.batch_size, self.temperature, self.top_p = engine, batch_size, temperature, top_p
        self.eos_ids, self.pad_id, self.device = list(eos_ids), pad_id, torch.device(device)

    def __call__(self, step: int, jobs: list[tuple[list[int], int, int]]) -> list[list[int]]:
        """``jobs``: (prompt ids, token limit, seed) -> one response per job."""
        out: list[list[int]] = []
        with self.engine.generation() as model:
            for b0 in range(0, len(jobs), self.batch_size):
                part = jobs[b0:b0 + self.batch_size]
                gens = [torch.Generator(device=self.device).manual_seed(s) for *_, s in part]
                out += sample_responses(model, [p for p, _, _ in part], limits=[lim for _, lim, _ in part],
                                        temperature=self.temperature, top_p=self.top_p, eos_ids=self.eos_ids,
                                        pad_id=self.pad_id, generators=gens)
        return out


class VLLMSampler:
    """``kd.on_policy.engine=vllm``: this rank's vLLM engine (``make_engine()``) writes its responses;
    its weights are the student's, copied every ``sync_every`` steps (see the module docstring)."""

    def __init__(self, engine, make_engine, *, sync_every: int, temperature: float, top_p: float, eos_ids):
        self.engine, self.sync_every, self.temperature, self.top_p = engine, sync_every, temperature, top_p
        self.eos_ids = list(eos_ids)
        self.vllm = make_engine()
        self.synced_at: int | None = None
        self.sync_s: float | None = None

    def sync(self) -> int:
        """Copy the student's weights into the engine (every rank enters: ZeRO-3 gathers them); the
        number of tensors copied."""
        with self.engine.generation() as model:
            return self.vllm.load_weights(model.state_dict().items())

    def __call__(self, step: int, jobs: list[tuple[list[int], int, int]]) -> list[list[int]]:
        self.sync_s = 0.0
        if self.synced_at is None or (step % self.sync_every == 0 and step != self.synced_at):
            t0 = time.perf_counter()
            self.sync()
            self.synced_at, self.sync_s = step, time.perf_counter() - t0
        if not jobs:
            return []
        return self.vllm.sample([p for p, _, _ in jobs], limits=[lim for _, lim, _ in jobs], temperature=self.temperature,
                                top_p=self.top_p, eos_ids=self.eos_ids, seeds=[s for _, _, s in jobs])

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.shutdown()
            self.vllm = None


class Rollout(Callback):
    """See the module docstring. ``sampler``: a :class:`StudentSampler` or :class:`VLLMSampler`."""

    def __init__(self, sampler, *, fraction: float, max_new_tokens: int, max_len: int, seed: int, global_batch: int,
                 device):
        self.sampler, self.fraction, self.max_new_tokens, self.max_len = sampler, fraction, max_new_tokens, max_len
        self.seed, self.global_batch = seed, global_batch
        self.device = torch.device(device)
        self.per_step = max(1, round(fraction * global_batch)) if fraction > 0 else 0
        self._stats = (0, 0, 0.0)  # this rank's sequences, tokens and seconds of the last rollout

    def chosen(self, step: int) -> set[int]:
        """The positions (0..global_batch-1) of step ``step``'s global batch the student writes."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7 * step + 11)
        return set(torch.randperm(self.global_batch, generator=g)[:self.per_step].tolist())

    def __call__(self, step: int, items: list[list[dict]], positions: list[list[int]],
                 indices: list[list[int]]) -> list[list[dict]]:
        """``items[m][j]`` (micro-batch m, row j) at global-batch position ``positions[m][j]`` and dataset
        index ``indices[m][j]`` -> the same items with the chosen ones' responses written by the student;
        every item gets ``on_policy`` (True / False)."""
        chosen = self.chosen(step)
        todo = [(m, j) for m, row in enumerate(positions) for j, p in enumerate(row) if p in chosen]
        out = [[{**it, "on_policy": False} for it in mb] for mb in items]
        t0 = time.perf_counter()
        jobs = []
        for m, j in todo:
            it = items[m][j]
            first = next((t for t, lab in enumerate(it["labels"]) if lab != IGNORE_INDEX), None)
            if first is None:
                continue  # nothing supervised: no prompt/response split to rewrite
            prompt = list(it["input_ids"][:first])
            limit = min(self.max_new_tokens, self.max_len - len(prompt))
            seed = example_seed(self.seed, step, indices[m][j])
            jobs.append((m, j, prompt, limit, seed))
        n_tokens = 0
        if self.per_step:  # every rank samples (a collective), also with no job of its own
            responses = self.sampler(step, [(p, lim, s) for _, _, p, lim, s in jobs])
            for (m, j, prompt, _, _), resp in zip(jobs, responses):
                out[m][j] = {**out[m][j], "input_ids": prompt + resp,
                             "labels": [IGNORE_INDEX] * len(prompt) + resp, "on_policy": True}
                n_tokens += len(resp)
        self._stats = (len(jobs), n_tokens, time.perf_counter() - t0)
        return out

    def close(self) -> None:
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()

    # -- the step's record ----------------------------------------------------------------------------
    def step_sums(self) -> dict[str, torch.Tensor]:
        seqs, tokens, _ = self._stats
        return {"gen_seqs": torch.tensor(float(seqs), device=self.device),
                "gen_tokens": torch.tensor(float(tokens), device=self.device)}

    def end_step(self, record: dict, sums: dict[str, float]) -> None:
        seqs, tokens = sums.get("gen_seqs", 0.0), sums.get("gen_tokens", 0.0)
        record["gen_seqs"], record["gen_tokens"] = int(seqs), int(tokens)
        record["gen_mean_len"] = tokens / seqs if seqs else 0.0
        record["gen_time_s"] = self._stats[2]
        if self.sampler.sync_s is not None:
            record["gen_sync_s"] = self.sampler.sync_s
        self._stats = (0, 0, 0.0)

    def line_extra(self, record: dict) -> str:
        return f" | gen {record['gen_tokens']} tok ({record['gen_mean_len']:.1f}/seq) {record['gen_time_s']:.1f}s"
