"""Training examples from teacher records: completion-only labels, skipped and truncated counts, top-k alignment."""

import logging

import pytest
import torch
from transformers import AutoTokenizer

from tests.distill.helpers import bitext_rows, make_records
from toolkit.distill.data import IGNORE, build_examples
from toolkit.distill.train import LeftPadCollator
from toolkit.errors import OptkitError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_loss_only_on_the_completion_which_ends_with_end_of_turn(tok):
    rec = make_records(bitext_rows(1))[0]
    (ex,), stats = build_examples([rec], tok, 256)
    text = tok.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:len(prompt)] == prompt
    assert all(label == IGNORE for label in ex["labels"][:len(prompt)])
    completion = ex["labels"][len(prompt):]
    assert tok.decode(completion[:-1]) == rec["output"] and completion[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert stats.as_dict() == {"examples": 1, "skipped_short_completions": 0, "truncated": 0, "topk_misaligned": 0,
                               "topk_partial": 0}


def test_empty_and_short_completions_are_skipped_with_a_count(tok, caplog):
    recs = make_records(bitext_rows(4), outputs=["", "ORDER", "a b c d e f", "  "])
    with caplog.at_level(logging.WARNING, logger="optkit.distill"):
        examples, stats = build_examples(recs, tok, 256, min_completion_tokens=2)
    assert [e["id"] for e in examples] == [recs[2]["id"]]
    assert stats.skipped_short == 3 and "skipped 3 training records" in caplog.text
    with pytest.raises(OptkitError, match="no usable training examples.*min_completion_tokens=1"):
        build_examples(make_records(bitext_rows(2), outputs=["", ""]), tok, 256)


def test_long_examples_are_truncated_from_the_prompt_side_with_a_count(tok, caplog):
    recs = make_records(bitext_rows(3))
    recs[0]["messages"][1]["content"] = "please help me " * 200
    with caplog.at_level(logging.WARNING, logger="optkit.distill"):
        examples, stats = build_examples(recs, tok, 128)
    assert stats.truncated == 1 and "truncated 1 training examples longer than training.max_length=128" in caplog.text
    ex = examples[0]
    assert len(ex["input_ids"]) == 128
    completion = [t for t in ex["labels"] if t != IGNORE]
    assert tok.decode(completion[:-1]) == recs[0]["output"]  # the answer survives, the prompt's head is cut


def test_topk_alignment_uses_rows_only_where_our_tokens_are_in_the_teachers_topk(tok):
    recs = make_records(bitext_rows(2), outputs=["ORDER", "REFUND"])
    ids0 = tok("ORDER", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    good = (torch.tensor([[t, 7, 8] for t in ids0], dtype=torch.int32), torch.full((len(ids0), 3), -1.0).half())
    bad = (torch.tensor([[5, 6, 7]], dtype=torch.int32), torch.full((1, 3), -1.0).half())
    examples, stats = build_examples(recs, tok, 256, topk={recs[0]["id"]: good, recs[1]["id"]: bad})
    assert examples[0]["topk_ids"].shape == (len(ids0), 3)
    assert examples[1]["topk_ids"] is None and stats.topk_misaligned == 1


def test_topk_is_used_up_to_the_first_token_that_re_tokenizes_differently(tok, caplog):
    """One differing token (the teacher generated "ĊĊ", the text re-encodes as "Ċ", "Ċ") dropped the example's
    whole top-k, silently: with stop strings most examples trained without KD and nothing said so."""
    recs = make_records(bitext_rows(1), outputs=["ORDER please now"])
    ids = tok("ORDER please now", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [[t, 7, 8] for t in ids]
    rows[2] = [5, 6, 7]  # the teacher's third token was another one
    topk = (torch.tensor(rows, dtype=torch.int32), torch.full((len(ids), 3), -1.0).half())
    with caplog.at_level(logging.WARNING, logger="optkit.distill"):
        examples, stats = build_examples(recs, tok, 256, topk={recs[0]["id"]: topk})
    assert examples[0]["topk_ids"].shape == (2, 3) and stats.topk_partial == 1 and stats.topk_misaligned == 0
    assert "cover 1 of 1 training examples only in part and 0 not at all" in caplog.text


def test_left_pad_collator_aligns_completions_at_the_right_edge(tok):
    examples, _ = build_examples(make_records(bitext_rows(3), outputs=["ORDER", "REFUND please now", "X"]), tok, 256)
    batch = LeftPadCollator(tok.pad_token_id, with_topk=False, share_prefix=False)(examples)
    assert batch["shared_prefix"] == 0
    width = batch["input_ids"].shape[1]
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, width - n:].tolist() == ex["input_ids"]
        assert batch["attention_mask"][i].sum() == n
        assert batch["position_ids"][i, -1] == n - 1 and batch["position_ids"][i, width - n] == 0
    # every completion token is predicted from inside the kept window
    keep = batch["logits_to_keep"]
    assert (batch["labels"][:, : width - keep + 1] == IGNORE).all()
    assert (batch["labels"][:, width - keep + 1:] != IGNORE).any()


def test_the_prompt_head_every_example_shares_is_laid_out_once_at_the_left(tok):
    examples, _ = build_examples(make_records(bitext_rows(3), outputs=["ORDER", "REFUND please now", "X"]), tok, 256)
    plain = LeftPadCollator(tok.pad_token_id, with_topk=False, share_prefix=False)(examples)
    batch = LeftPadCollator(tok.pad_token_id, with_topk=False)(examples)
    p = batch["shared_prefix"]
    # the chat template's system prompt and the template's head, never a token that carries loss
    assert p >= 16 and all(ex["input_ids"][:p] == examples[0]["input_ids"][:p] for ex in examples)
    assert p < min(ex["prompt_len"] for ex in examples)
    assert batch["input_ids"].shape == plain["input_ids"].shape
    width = batch["input_ids"].shape[1]
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :p].tolist() == ex["input_ids"][:p]
        assert batch["input_ids"][i, width - (n - p):].tolist() == ex["input_ids"][p:]
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == ex["input_ids"]
        assert batch["position_ids"][i][real].tolist() == list(range(n))  # as if unpadded
    # the completions sit where they sit with plain left padding: same labels, same kept window
    assert torch.equal(batch["labels"][:, -batch["logits_to_keep"]:], plain["labels"][:, -plain["logits_to_keep"]:])


def test_no_end_of_turn_after_an_output_cut_at_max_new_tokens(tok):
    recs = make_records(bitext_rows(2), outputs=["This message is about", "ORDER"])
    recs[0]["finish_reason"] = "length"
    (cut, done), _ = build_examples(recs, tok, 256)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert cut["labels"][-1] != eot and tok.decode(cut["labels"][cut["prompt_len"]:]) == "This message is about"
    assert done["labels"][-1] == eot



def test_a_sliding_window_model_scores_a_shared_prefix_batch_as_it_scores_each_example_alone(tok):
    """Padding between the shared prefix and a row's own tokens would count inside a sliding attention window, so
    for a model whose window is narrower than the batch, forward runs the plain left-padded batch instead. A real
    (tiny, random) Mistral with an 8-token window: the kept logits equal each example's own unpadded forward."""
    from transformers import MistralConfig, MistralForCausalLM

    from toolkit.engines.hf import forward

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=8, pad_token_id=tok.pad_token_id)).eval()
    examples, _ = build_examples(make_records(bitext_rows(3), outputs=["ORDER", "REFUND please now", "X"]), tok, 256)
    batch = LeftPadCollator(tok.pad_token_id, with_topk=False)(examples)
    assert batch["shared_prefix"] > 8
    keep = batch["logits_to_keep"]
    with torch.no_grad():
        got = forward(model, batch, keep).logits
        for i, ex in enumerate(examples):
            alone = model(torch.tensor([ex["input_ids"]])).logits[0]
            n = min(keep, len(ex["input_ids"]))
            assert torch.allclose(got[i, keep - n:], alone[-n:], atol=1e-4), i
