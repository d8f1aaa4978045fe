"""SentiBench evaluation: the paper's protocol (prompts, verbalizers, parsing, metrics), runner, reports.

Light to import: ``LABEL_WORDS``/``INSTRUCTIONS`` are plain data; ``evaluate`` loads torch on first use.
"""

from distill.eval.protocol import INSTRUCTIONS, LABEL_WORDS, TUPLE_FIELDS, build_prompt, build_prompts

__all__ = ["INSTRUCTIONS", "LABEL_WORDS", "TUPLE_FIELDS", "build_prompt", "build_prompts", "evaluate", "verbalizer_ids"]


def __getattr__(name):
    if name == "evaluate":
        from distill.eval.sentibench import evaluate

        return evaluate
    if name == "verbalizer_ids":
        from distill.eval.runner import verbalizer_ids

        return verbalizer_ids
    raise AttributeError(name)
