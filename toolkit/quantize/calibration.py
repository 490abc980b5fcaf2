"""Task text for calibration (train split) and for verification (test split).

Quantizers fit their scales to the activations they see, so they are calibrated on the recipe's own
prompts (and, by default, the teacher's answers: the student will produce text like them). Source order:
collect/outputs.jsonl (prompts + teacher outputs) -> collect/prompts.jsonl -> the recipe's data file.
Evaluation texts come from the test split and never overlap the calibration texts.
"""

from __future__ import annotations

import json
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


def calibration_examples(examples: list[Example], cfg) -> list[Example]:
    """The calibration pool: the train split (val only when there is a test split to score on), at most
    cfg.num_samples."""
    pool = [e for e in examples if e.split == "train"]
    if not pool and any(e.split == "test" for e in examples):
        pool = [e for e in examples if e.split == "val"]
    return pool[:cfg.num_samples]


def calibration_texts(examples: list[Example], renderer, cfg) -> list[str]:
    """Rendered texts of calibration_examples. Tokenized without added special tokens
    (toolkit/quantize/llmc.py), the prompt part gives the teacher's prompt ids."""
    with_answer = cfg.source == "prompts+outputs"
    if with_answer and not any(e.teacher for e in examples):
        log.warning("quantize: no teacher outputs found; calibrating on the prompts alone")
    texts = [render(e, renderer, with_answer) for e in calibration_examples(examples, cfg)]
    if len(texts) < cfg.min_samples:
        raise OptkitError(f"quantize.calibration: only {len(texts)} calibration texts in the train split, fewer "
                          f"than quantize.calibration.min_samples = {cfg.min_samples}; add data or lower it")
    if len(texts) < cfg.num_samples:
        log.warning("quantize: %d calibration texts, fewer than num_samples = %d", len(texts), cfg.num_samples)
    return texts


def prompt_key(example: Example) -> str:
    """What makes two examples the same prompt, whatever their id or split."""
    return json.dumps(example.messages, sort_keys=True, ensure_ascii=False)


def eval_examples(examples: list[Example], n: int, calibration: list[Example],
                  splits: tuple[str, ...] = ("test", "val")) -> list[Example]:
    """Held-out examples: the first of `splits` that has any (test, else val), minus every prompt the
    quantizers were calibrated on (a prompt duplicated across splits would score the model on what it was
    fitted to, which flatters the artifact). Disjoint by construction; the tests check it."""
    used = {prompt_key(e) for e in calibration}
    for split in splits:
        held = [e for e in examples if e.split == split]
        if held:
            break
    kept = [e for e in held if prompt_key(e) not in used]
    if len(kept) < len(held):
        log.warning("quantize: %d held-out prompts also calibrate the model; not scored", len(held) - len(kept))
    if not kept:
        raise OptkitError(f"quantize: no {' or '.join(splits)} prompts left to verify on that are not calibration "
                          "prompts (data.splits.test is 0, or the held-out split repeats the train split)")
    return kept[:n]
