"""Fixtures of the losses tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # The test tensors are small: on a shared 2-core machine intra-op threading costs more in
    # synchronisation than it saves (5x slower chunk loops under load). Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
