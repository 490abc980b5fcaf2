"""The verification probe: perplexity over whole texts and over the teacher's answers alone (what a distilled
student is trained on), scored on the same token ids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.engines.render import Renderer
from toolkit.quantize.calibration import Example
from toolkit.quantize.verify import NLL, build_probe


def test_answer_perplexity_scores_only_the_answer_tokens():
    vocab, ids, start = 8, [1, 2, 3, 4, 5, 6], 3  # tokens 3.. (4, 5, 6) are the answer
    logits = np.zeros((len(ids), vocab))  # uniform: every prompt token costs log(8)
    for pos in range(start - 1, len(ids) - 1):  # the positions that predict answer tokens: near-certain
        logits[pos, ids[pos + 1]] = 50.0
    nll = NLL()
    nll.add(logits, ids, start)
    res = nll.result()
    assert res["answer_tokens"] == 3 and res["eval_tokens"] == 5
    assert res["answer_perplexity"] == pytest.approx(1.0, abs=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(2 * math.log(vocab) / 5), abs=1e-4)  # rounded to 4 places


def test_a_text_without_an_answer_adds_no_answer_tokens():
    nll = NLL()
    nll.add(np.zeros((4, 5)), [1, 2, 3, 4], answer_start=4)
    assert "answer_perplexity" not in nll.result()


def test_probe_answer_starts_point_at_the_teacher_answer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    msgs = [{"role": "user", "content": "Where is my parcel? It was due on Monday."}]
    examples = [Example("a", "test", msgs, "DELIVERY", "DELIVERY"), Example("b", "test", msgs, None, None)]
    probe = build_probe(examples, Renderer(tok, True), eval_n=2, gen_n=1, max_length=256, max_new_tokens=4)
    first, second = probe.eval_ids
    assert tok.decode(first[probe.answer_starts[0]:]) == "DELIVERY" + tok.eos_token
    assert probe.answer_starts[1] == len(second)  # no teacher answer: nothing is an answer token


def test_a_broken_artifact_scores_null_not_nan_and_does_not_crash():
    """A NaN score went into summary.json as the token NaN; a mean loss beyond ~709 nats raised OverflowError."""
    from toolkit.quantize.verify import add_increases

    for total in (float("nan"), 800.0 * 5):
        nll = NLL()
        nll.add_nll([total / 5] * 5, 3)
        res = nll.result()
        assert res["perplexity"] is None and res["answer_perplexity"] is None and res["eval_tokens"] == 5
        add_increases(res, {"perplexity": 3.0, "answer_perplexity": 2.0})
        assert "ppl_increase_pct" not in res and "answer_ppl_increase_pct" not in res
