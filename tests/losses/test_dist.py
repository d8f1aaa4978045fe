"""2 ranks x 2 micro-batches == 1 rank on the whole batch (gloo on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.losses.objective import count_targets

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _dist_worker as W  # noqa: E402

sys.path.remove(str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_ranks_two_micro_batches_equal_one_rank(tmp_path):
    weight, hs, teacher, labels = W.make_problem()
    counts = [count_targets(labels[m]) for m in range(hs.shape[0])]
    assert len(set(counts)) > 2, counts  # uneven: per-micro-batch means would be wrong

    # 1 rank, whole batch at once.
    n_mb, b, length, hidden = hs.shape
    w1 = weight.clone().requires_grad_()
    obj = W.objective()
    flat = lambda x: x.reshape(n_mb * b, *x.shape[2:])  # noqa: E731
    whole = obj(flat(hs) @ w1.t(), flat(teacher), flat(labels), sum(counts))
    whole.loss.backward()

    out = tmp_path / "rank0.pt"
    port = str(_free_port())
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_worker.py"), str(r), "2", port,
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    res = torch.load(out)

    assert float(res["normalizer"]) == sum(counts)
    torch.testing.assert_close(res["loss"], whole.loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res["grad"], w1.grad, rtol=1e-5, atol=1e-7)

    # Sensitivity: normalising each micro-batch by its own count gives a different gradient.
    w2 = weight.clone().requires_grad_()
    for m in range(n_mb):
        (obj(hs[m] @ w2.t(), teacher[m], labels[m], counts[m]).loss / n_mb).backward()
    assert not torch.allclose(w2.grad, w1.grad, rtol=1e-3, atol=1e-5)
