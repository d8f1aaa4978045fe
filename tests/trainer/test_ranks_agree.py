"""Nodes that disagree (code version, resolved config, world size, tokenizer) stop before step 1 with
one line naming the node and the difference (distill.dist.env.ranks_disagree; the trainer gathers every
rank's fingerprint in setup, which the 2-rank tests run through with agreeing ranks)."""

from __future__ import annotations

import pytest

from distill.dist.env import ranks_disagree


def _fp(host, **over):
    fp = {"host": host, "code": "a1b2c3d4e5f6", "config": "c0ffee" * 10, "world_size": 4, "tokenizer": "f00d" * 16}
    fp.update(over)
    return fp


def test_agreeing_ranks_pass():
    assert ranks_disagree([_fp("gpu-01"), _fp("gpu-01"), _fp("gpu-02"), _fp("gpu-02")]) is None


@pytest.mark.parametrize("field,label", [("code", "code version"), ("config", "resolved-config hash"),
                                         ("world_size", "world size"), ("tokenizer", "tokenizer fingerprint")])
def test_a_differing_node_is_named_with_the_field(field, label):
    prints = [_fp("gpu-01"), _fp("gpu-01"), _fp("gpu-02", **{field: "other"}), _fp("gpu-02")]
    msg = ranks_disagree(prints)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("rank 2 on node gpu-02 does not match rank 0 on node gpu-01")
    assert label in msg and "other" in msg
    assert sum(lab in msg for lab in ("code version", "resolved-config hash", "world size",
                                       "tokenizer fingerprint")) == 1


def test_every_difference_of_the_first_bad_rank_is_listed():
    msg = ranks_disagree([_fp("a"), _fp("b", code="old", world_size=2)])
    assert "code version old" in msg and "world size 2 (rank 0: 4)" in msg
