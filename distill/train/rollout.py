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

Generation runs once per step, at its start (after the previous optimizer step: the newest weights),
for all this rank's chosen examples, in batches of ``batch_size``, inside the engine's
``generation()`` block (under ZeRO-3 the weights are gathered once for the whole block; every rank
enters it, also one with nothing to write). Logged per step: ``gen_tokens`` and ``gen_seqs`` (all
ranks), ``gen_mean_len`` and ``gen_time_s`` (this rank's seconds).
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


class Rollout(Callback):
    """See the module docstring. ``engine``: the student's (its ``generation()`` block);
    ``eos_ids`` end a response (kept as its last token)."""

    def __init__(self, engine, *, fraction: float, max_new_tokens: int, temperature: float, top_p: float,
                 batch_size: int, max_len: int, seed: int, global_batch: int, eos_ids, pad_id: int, device):
        self.engine, self.fraction, self.max_new_tokens = engine, fraction, max_new_tokens
        self.temperature, self.top_p, self.batch_size, self.max_len = temperature, top_p, batch_size, max_len
        self.seed, self.global_batch, self.eos_ids, self.pad_id = seed, global_batch, list(eos_ids), pad_id
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
        if self.per_step:  # every rank enters the block (a ZeRO-3 collective), also with no job of its own
            with self.engine.generation() as model:
                for b0 in range(0, len(jobs), self.batch_size):
                    part = jobs[b0:b0 + self.batch_size]
                    gens = [torch.Generator(device=self.device).manual_seed(s) for *_, s in part]
                    responses = sample_responses(model, [p for _, _, p, _, _ in part], limits=[lim for *_, lim, _ in part],
                                                 temperature=self.temperature, top_p=self.top_p, eos_ids=self.eos_ids,
                                                 pad_id=self.pad_id, generators=gens)
                    for (m, j, prompt, _, _), resp in zip(part, responses):
                        out[m][j] = {**out[m][j], "input_ids": prompt + resp,
                                     "labels": [IGNORE_INDEX] * len(prompt) + resp, "on_policy": True}
                        n_tokens += len(resp)
        self._stats = (len(jobs), n_tokens, time.perf_counter() - t0)
        return out

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
        self._stats = (0, 0, 0.0)

    def line_extra(self, record: dict) -> str:
        return f" | gen {record['gen_tokens']} tok ({record['gen_mean_len']:.1f}/seq) {record['gen_time_s']:.1f}s"
