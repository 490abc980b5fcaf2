"""Task text for calibration (train split) and for verification (test split).

Quantizers fit their scales to the activations they see, so they are calibrated on the recipe's own
prompts (and, by default, the teacher's answers: the student will produce text like them). Source order:
collect/outputs.jsonl (prompts + teacher outputs) -> collect/prompts.jsonl -> the recipe's data file.
Evaluation texts come from the test split and never overlap the calibration texts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.quantize")


@dataclass
class Example:
    id: str
    split: str
    messages: list[dict]
    reference: Optional[str]  # gold answer, when the data has one
    teacher: Optional[str]  # teacher output, when collect ran
    finish_reason: Optional[str] = None  # the teacher's ("length": cut at max_new_tokens, no end-of-turn)


def load_examples(ctx) -> list[Example]:
    """Every prompt we know of, with the teacher's output when there is one."""
    from toolkit.io import read_jsonl

    if ctx.has_upstream("collect"):
        from toolkit.records import load_records

        collect = ctx.upstream("collect")
        rows = load_records(collect)
        if rows:
            return [Example(r["id"], r["split"], r["messages"], r.get("reference"), r.get("output"),
                            r.get("finish_reason")) for r in rows]
        if (collect / "prompts.jsonl").is_file():
            return [Example(r["id"], r["split"], r["messages"], r.get("reference"), None)
                    for r in read_jsonl(collect / "prompts.jsonl")]
    from toolkit.collect.prompts import load_prompts

    path = ctx.add_input(ctx.recipe.resolve_path(ctx.recipe.data.path))
    return [Example(p.id, p.split, p.messages, p.reference, None)
            for p in load_prompts(ctx.recipe.data, path, ctx.recipe.seed)]


def renderer_for(ctx, tok):
    """The one rendering of toolkit.engines (the recipe's data.chat_template), as the teacher and student saw it."""
    from toolkit.engines.render import Renderer

    return Renderer(tok, ctx.recipe.data.chat_template, "the quantize source")


def render(example: Example, renderer, with_answer: bool) -> str:
    """The conversation as the model sees it: the rendered prompt, then the teacher's answer when asked for."""
    text = renderer.prompt(example.messages).text
    if with_answer and example.teacher:
        text += renderer.answer_text(example.teacher, example.finish_reason)
    return text


def calibration_texts(examples: list[Example], renderer, cfg) -> list[str]:
    """Train-split texts (val, then test, only when train is too small), at most cfg.num_samples. Tokenized
    without added special tokens (toolkit/quantize/llmc.py), the prompt part gives the teacher's prompt ids."""
    with_answer = cfg.source == "prompts+outputs"
    if with_answer and not any(e.teacher for e in examples):
        log.warning("quantize: no teacher outputs found; calibrating on the prompts alone")
    pool = [e for e in examples if e.split == "train"] or [e for e in examples if e.split == "val"]
    texts = [render(e, renderer, with_answer) for e in pool[:cfg.num_samples]]
    if len(texts) < cfg.min_samples:
        raise OptkitError(f"quantize.calibration: only {len(texts)} calibration texts in the train split, fewer "
                          f"than quantize.calibration.min_samples = {cfg.min_samples}; add data or lower it")
    if len(texts) < cfg.num_samples:
        log.warning("quantize: %d calibration texts, fewer than num_samples = %d", len(texts), cfg.num_samples)
    return texts


def eval_examples(examples: list[Example], n: int) -> list[Example]:
    """Held-out examples: the test split (val when there is none)."""
    held = [e for e in examples if e.split == "test"] or [e for e in examples if e.split == "val"]
    if not held:
        raise OptkitError("quantize: no test or val prompts to verify on (data.splits.test is 0?)")
    return held[:n]
