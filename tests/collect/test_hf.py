"""The hf backend on the real SmolLM2-135M-Instruct teacher (CPU): batching with left padding, token
counts, finish reasons, top-k log-probs, stop strings, seeded sampling, and the whole stage."""

from __future__ import annotations

import json

import pytest

from tests.collect.conftest import bitext_rows, read_jsonl, write_recipe
from toolkit.config import recipe_from_dict

pytestmark = pytest.mark.slow


def make_recipe(**collect):
    return recipe_from_dict({"name": "t", "teacher": {"model": "smollm2-135m-instruct", "dtype": "float32"},
                             "data": {"path": "unused.jsonl"}, "collect": {"backend": "hf", **collect}})


def messages(n: int, short: bool = False) -> list[list[dict]]:
    ask = ("What is this message about? Choose one of: ACCOUNT, ORDER, REFUND, DELIVERY, PAYMENT. Answer with a "
           "single category name." if short else "What is this customer message about?")
    return [[{"role": "user", "content": f"Customer message: \"{r['instruction']}\"\n\n{ask}"}]
            for r in bitext_rows(n)]


@pytest.fixture(scope="module")
def fp32_backend(smollm2_dir):
    """One fp32 teacher engine for the module (fp32: greedy answers must not depend on padding rounding)."""
    from toolkit.engines import HFEngine

    return HFEngine.for_teacher(make_recipe())


class Backend:
    """The loaded engine with a recipe's settings (loading the model again would cost seconds)."""

    def __init__(self, engine, recipe):
        from toolkit.collect.backends import settings

        self.engine, self.tok, self.settings = engine, engine.tok, settings(recipe)

    def eos_ids(self):
        return self.engine.eos


def backend_with(loaded, **collect):
    return Backend(loaded, make_recipe(**collect))


def run_batch(backend, msgs):
    return backend.engine.run_batch(msgs, backend.settings)[0]


def test_batched_left_padded_equals_one_at_a_time(fp32_backend):
    b = backend_with(fp32_backend, generation={"max_new_tokens": 10})
    msgs = messages(6)
    assert b.tok.padding_side == "left"
    batched = run_batch(b, msgs)
    alone = [run_batch(b, [m])[0] for m in msgs]
    assert len({r["input_tokens"] for r in batched}) > 1  # prompts of different lengths: padding was needed
    assert [r["output"] for r in batched] == [r["output"] for r in alone]
    for m, r in zip(msgs, batched):
        ids = b.tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert r["input_tokens"] == len(ids)
        assert r["latency_s"] > 0


def test_a_batch_computes_its_shared_prefix_once_with_the_same_answers(fp32_backend):
    """The system prompt, chat header and template head every prompt starts with go through the model once per
    batch (batch 1, its KV cache repeated), not once per row: fewer prefill tokens, the same answers and
    log-probs as the plain left-padded batch (fp32)."""
    b = backend_with(fp32_backend, generation={"max_new_tokens": 12}, top_logprobs=2)
    msgs = [[{"role": "system", "content": "You sort customer-support messages. Categories: ACCOUNT, ORDER, REFUND, "
              "DELIVERY, PAYMENT."}] + m for m in messages(7, short=True)]
    ids = [b.engine.prompt_ids(m) for m in msgs]
    shared = b.engine._shared_prefix(ids, 12)
    assert shared >= 30 and all(x[:shared] == ids[0][:shared] for x in ids)

    seen: list[tuple] = []  # (rows, tokens) of every forward pass that takes more than one token per row
    hook = b.engine.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(kw["input_ids"].shape)) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        with_prefix = run_batch(b, msgs)
        prefill_shared, seen[:] = list(seen), []
        b.engine.share_prefix = False
        plain = run_batch(b, msgs)
        prefill_plain = list(seen)
    finally:
        b.engine.share_prefix = True
        hook.remove()
    assert prefill_shared == [(1, shared), (7, max(map(len, ids)) - shared)]
    assert prefill_plain == [(7, max(map(len, ids)))]
    for a, p in zip(with_prefix, plain):
        assert [a[k] for k in ("output", "output_tokens", "input_tokens")] == \
            [p[k] for k in ("output", "output_tokens", "input_tokens")]
        assert a["topk"]["ids"] == p["topk"]["ids"]
        assert max(abs(x - y) for ra, rp in zip(a["topk"]["logprobs"], p["topk"]["logprobs"])
                   for x, y in zip(ra, rp)) < 1e-3


def test_no_shared_prefix_where_padding_would_shift_a_sliding_window(fp32_backend):
    engine = fp32_backend
    ids = [engine.prompt_ids(m) for m in messages(4)]
    assert engine._shared_prefix(ids, 12) >= 16
    assert engine._shared_prefix(ids[:1], 12) == 0  # a batch of one has nothing to share
    cfg = engine.model.config
    old = getattr(cfg, "sliding_window", None)
    try:
        cfg.sliding_window = max(map(len, ids)) + 11  # prompt + answer just past the window
        assert engine._shared_prefix(ids, 12) == 0
        cfg.sliding_window = max(map(len, ids)) + 12
        assert engine._shared_prefix(ids, 12) >= 16
    finally:
        cfg.sliding_window = old


def test_a_timed_request_returns_the_answer_a_batch_of_one_gives(fp32_backend):
    # evaluate's batch-movement check reads the latency run's answers instead of generating them a second time
    b = backend_with(fp32_backend, generation={"max_new_tokens": 10})
    for m in messages(3):
        t = b.engine.timed(m, b.settings)
        alone = run_batch(b, [m])[0]
        assert t.output == alone["output"] and t.output_tokens == alone["output_tokens"]
        assert 0 < t.ttft_s <= t.e2e_s and len(t.itl_s) == t.output_tokens - 1


def test_token_counts_finish_reasons_and_topk_agree(fp32_backend):
    b = backend_with(fp32_backend, generation={"max_new_tokens": 16}, top_logprobs=3)
    results = run_batch(b, messages(4, short=True) + messages(4))  # short answers and long ones
    eos = b.eos_ids()
    assert {r["finish_reason"] for r in results} == {"stop", "length"}  # both occur in this set
    for r in results:
        ids, lps = r["topk"]["ids"], r["topk"]["logprobs"]
        assert len(ids) == len(lps) == r["output_tokens"] and all(len(row) == 3 for row in ids)
        top1 = [row[0] for row in ids]  # greedy: the top-1 token is the token generated
        assert b.tok.decode(top1, skip_special_tokens=True) == r["output"]
        if r["finish_reason"] == "stop":
            assert top1[-1] in eos and r["output_tokens"] <= 16
        else:
            assert r["output_tokens"] == 16 and top1[-1] not in eos
        assert all(row[0] >= row[1] >= row[2] and row[0] <= 0 for row in lps)


def test_stop_strings_cut_the_answer(fp32_backend):
    msgs = messages(6)
    free = run_batch(backend_with(fp32_backend, generation={"max_new_tokens": 12}), msgs)
    cut = run_batch(backend_with(fp32_backend, generation={"max_new_tokens": 12, "stop": [" about"]}), msgs)
    hit = [(f, c) for f, c in zip(free, cut) if " about" in f["output"]]
    assert hit, "the test needs answers that contain the stop string"
    for f, c in hit:
        assert c["output"] == f["output"][:f["output"].index(" about")] and c["finish_reason"] == "stop"


def test_sampling_is_seeded_and_differs_from_greedy(fp32_backend):
    msgs = messages(4)

    def answers(**gen):
        b = backend_with(fp32_backend, generation={"max_new_tokens": 12, **gen})
        return [r["output"] for r in b.engine.generate(msgs, b.settings)]

    first, second, greedy = answers(temperature=1.0), answers(temperature=1.0), answers()
    assert first == second  # same recipe seed, same answers
    assert first != greedy


def test_stage_end_to_end_with_topk_resume_and_tokens(workdir, smollm2_dir):
    from toolkit.cli import main
    from toolkit.models import bf16_supported
    from toolkit.records import FIELDS, load_topk

    collect = {"backend": "hf", "generation": {"max_new_tokens": 6}, "hf": {"batch_size": 4}, "top_logprobs": 2}
    path = write_recipe(workdir, collect, data={"limit": 12, "splits": {"train": 0.5, "val": 0.25, "test": 0.25}},
                        pricing={"teacher": {"input_per_1m": 1.0, "output_per_1m": 4.0}})
    assert main(["run", str(path)]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    prompts = read_jsonl(out / "prompts.jsonl")
    assert len(records) == len(prompts) == 12 and read_jsonl(out / "failures.jsonl") == []
    assert all(set(FIELDS) <= set(r) for r in records)
    assert {p["split"] for p in prompts} <= {"train", "val", "test"}
    for r in records:
        # prices are evaluate's business: a record holds token counts, so a price change never re-collects
        assert "cost_usd" not in r and r["input_tokens"] > 0 and 0 < r["output_tokens"] <= 6
        assert r["model"] == "smollm2-135m-instruct" and r["reference"] and r["prompt"] in r["messages"][-1]["content"]
    topk = load_topk(out)
    assert set(topk) == {r["id"] for r in records}
    assert all(tuple(topk[r["id"]][0].shape) == (r["output_tokens"], 2) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in records)
    assert summary["input_tokens"] == sum(r["input_tokens"] for r in records)
    assert summary["teacher"]["dtype"] == ("bfloat16" if bf16_supported() else "float32")
    assert summary["answered_this_run"] == 12

    # Outputs lost (or a changed stage config elsewhere): the answers come from the store, nothing regenerated.
    (out / "manifest.json").unlink()
    (out / "outputs.jsonl").unlink()
    assert main(["run", str(path)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["from_store"] == 12 and summary["answered_this_run"] == 0
    assert read_jsonl(out / "outputs.jsonl") == records
