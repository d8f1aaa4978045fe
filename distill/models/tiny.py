"""Tiny models and a tokenizer trained here, for tests and the built-in defaults.

This machine reaches no model hub, so built-in defaults and tests use Llama-architecture models of a
few hundred thousand parameters with a byte-level BPE tokenizer trained in-process on SentiBench
text. They are ordinary ``transformers`` objects: ``save_pretrained`` folders load with
``AutoModelForCausalLM`` / ``AutoTokenizer`` like any hub model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# Label words of every SentiBench task, with their leading space, so the trained tokenizer has them
# (and they keep distinct first sub-tokens, which the evaluation's verbalizer requires).
LABEL_WORDS = (
    "negative", "positive", "neutral", "non-irony", "irony", "anger", "joy", "sadness", "optimism",
    "against", "favor", "not intimate", "moderately intimate", "highly intimate", "conflict",
)

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 4096):
    """Byte-level BPE trained on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Deterministic for the same texts. bos/eos/pad/unk are ids 0..3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("bos", "eos", "pad", "unk")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the label words so they become single tokens even in a tiny vocabulary.
    label_lines = [" " + " ".join(f"Label: {w}" for w in LABEL_WORDS)] * 50

    def corpus():
        yield from label_lines
        yield from texts

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=model_max_length,
        padding_side="left",
    )


@dataclass(frozen=True)
class TinySize:
    hidden: int  # model width
    layers: int  # decoder layers
    heads: int  # attention heads
    kv_heads: int  # key/value heads (GQA)
    intermediate: int  # MLP width


# Sizes used by the built-in defaults and tests (parameters at vocab 4096, tied embeddings off).
SIZES = {
    "teacher": TinySize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352),  # ~1.5M
    "student": TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176),  # ~0.6M
    "micro": TinySize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),  # tests
}


def tiny_llama_config(vocab_size: int, size: str | TinySize = "student", *, max_position_embeddings: int = 4096, **overrides):
    """A ``LlamaConfig`` of the named tiny size for a tokenizer of ``vocab_size`` tokens."""
    from transformers import LlamaConfig

    s = SIZES[size] if isinstance(size, str) else size
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_causal_lm(vocab_size: int, size: str | TinySize = "student", *, seed: int = 0, **overrides):
    """A randomly initialised tiny ``LlamaForCausalLM`` (fp32, eval mode off), seeded."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(vocab_size, size, **overrides)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model
