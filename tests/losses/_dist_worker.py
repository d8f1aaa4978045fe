"""One rank of test_dist.py: 2 micro-batches of a tiny linear "model" under the objective.

Usage: python _dist_worker.py RANK WORLD PORT OUT.pt. gloo on 127.0.0.1 only.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def make_problem(seed: int = 0, n_mb: int = 4, b: int = 2, length: int = 10, hidden: int = 16,
                 vocab: int = 50):
    """Global batch split in n_mb micro-batches with UNEVEN numbers of response tokens."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.3
    hidden_states = torch.randn(n_mb, b, length, hidden, generator=g)
    teacher = torch.randn(n_mb, b, length, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, (n_mb, b, length), generator=g)
    prompt = torch.tensor([[1, 8], [5, 2], [9, 9], [0, 3]])  # per sequence
    for m in range(n_mb):
        for i in range(b):
            labels[m, i, : prompt[m, i]] = -100
    labels[1, 0, -3:] = -100  # right padding
    return weight, hidden_states, teacher, labels


def objective():
    from distill.losses.objective import DistillObjective

    return DistillObjective(kind="jsd", beta=0.5, temperature=2.0, ce_weight=0.5, impl="torch",
                            chunk_tokens=3)


def main() -> None:
    from distill.losses.objective import count_targets

    rank, world, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    weight, hs, teacher, labels = make_problem()
    per_rank = hs.shape[0] // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    # The step's normaliser: local counts summed over micro-batches, then over ranks.
    n = torch.tensor(sum(count_targets(labels[m]) for m in mine), dtype=torch.float64)
    dist.all_reduce(n)
    w = weight.clone().requires_grad_()
    obj = objective()
    total = torch.zeros(())
    for m in mine:  # gradient accumulation over this rank's micro-batches
        out = obj(hs[m] @ w.t(), teacher[m], labels[m], n)
        out.loss.backward()
        total += out.loss.detach()
    dist.all_reduce(w.grad)  # SUM over ranks: the normaliser already covers every token
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total, "grad": w.grad, "normalizer": n}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
