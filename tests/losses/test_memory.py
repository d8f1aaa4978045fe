"""Peak memory of the chunked loss: gradient + one chunk's working set, measured by VmHWM.

Method (distill/losses/bench_memory.py): each case runs in a fresh subprocess; after the inputs
exist the resident-set high-water mark is reset (/proc/self/clear_refs) and the peak above the
inputs is read from VmHWM, with glibc's mmap threshold fixed so freed blocks leave the RSS. The
eager row checks that the method sees torch's CPU allocations at all.
"""

from __future__ import annotations

import os

import pytest

from distill.losses.bench_memory import measure_many

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")

MIB = 1024 * 1024
CASE = dict(tokens=256, vocab=32_000, dtype="float32", chunk_tokens=16, threads=1)
FULL = 4 * 256 * 32_000  # one fp32 [tokens x vocab] tensor (= the fp32 gradient), 31 MiB
CHUNK = 4 * 16 * 32_000  # one fp32 [chunk x vocab] tensor, 2 MiB
SLACK = 8 * MIB  # interpreter / allocator noise


def test_chunked_peak_is_gradient_plus_one_chunk_working_set():
    names = [("forward_kl", "eager", "float32"), ("forward_kl", "chunked", "float32"),
             ("jsd", "chunked", "float32"), ("forward_kl", "chunked_inplace", "float32"),
             ("jsd", "chunked", "bfloat16")]
    rows = measure_many([dict(CASE, kind=k, impl=i, dtype=d) for k, i, d in names])
    peak = {n: r["peak_extra_mib"] * MIB for n, r in zip(names, rows)}
    # The method sees torch's allocations: eager holds several fp32 [tokens x vocab] copies.
    assert peak["forward_kl", "eager", "float32"] > 3 * FULL
    for kind in ("forward_kl", "jsd"):
        # gradient + at most 8 chunk tensors (measured: forward KL ~5, JSD ~6)
        got = peak[kind, "chunked", "float32"]
        assert got <= FULL + 8 * CHUNK + SLACK, (kind, got / MIB)
    assert peak["forward_kl", "chunked_inplace", "float32"] <= 8 * CHUNK + SLACK
    # bf16: the gradient is bf16 (half of FULL) and backward's scaling makes no fp32 copy of it
    # (a plain bf16 *= fp32 on CPU would: 2 fp32 copies).
    assert peak["jsd", "chunked", "bfloat16"] <= FULL / 2 + 8 * CHUNK + SLACK
