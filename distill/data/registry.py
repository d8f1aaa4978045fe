"""The registry of training datasets (``data.name``), with the built-in ``sft``.

A factory ``factory(cfg, tokenizer, ctx)`` returns an object with ``__len__`` and ``__getitem__`` ->
dict with ``input_ids`` and ``labels`` lists (plus any pass-through keys, e.g. ``example_id``) and
optionally ``collate(items) -> batch``; ``ctx`` is the run's
:class:`~distill.teacher.base.BackendContext`. A stage with a dataset of its own (ICLDist) hands it to
the run builder directly instead of registering it.
"""

from __future__ import annotations

from typing import Callable

from distill.errors import UserError

DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    """Decorator: ``factory(cfg: RunConfig, tokenizer, ctx: BackendContext) -> dataset``."""

    def deco(factory):
        DATASETS[name] = factory
        return factory

    return deco


def dataset_factory(name: str) -> Callable:
    """The factory registered as ``name``; a one-line error naming ``data.name`` and the known names."""
    if name not in DATASETS:
        raise UserError(f"data.name={name!r} is not registered; known: {sorted(DATASETS)}")
    return DATASETS[name]


@register_dataset("sft")
def sft_dataset(cfg, tokenizer, ctx):
    """``data.name=sft``: prompt/response records from ``data.path`` (distill.data.sft)."""
    from distill.data.sft import DataError, SFTDataset, read_records

    d = cfg.data
    if not d.path:
        raise DataError("data.path is empty: give a JSONL/JSON/Parquet file, a folder of them, or a datasets name")
    recs = read_records(d.path, d.format, prompt_field=d.prompt_field, response_field=d.response_field,
                        split=d.split, limit=d.limit, allow_partial=d.allow_partial)
    return SFTDataset(recs, tokenizer, d.max_len, d.add_eos)
