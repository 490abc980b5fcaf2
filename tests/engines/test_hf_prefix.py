"""The batch layout the hf engine generates from when a batch shares a prefix (no model needed): the shared
tokens once at the left, then each row's own tokens right-aligned after padding, masks marking both."""

from __future__ import annotations

from toolkit.engines.hf import encode_after_prefix


def test_rows_keep_the_prefix_left_and_their_own_tokens_at_the_right_edge():
    ids = [[5, 6, 7, 1, 2], [5, 6, 7, 3], [5, 6, 7, 4, 4, 4]]
    enc = encode_after_prefix(ids, 3, pad_id=0, device="cpu")
    assert enc["input_ids"].tolist() == [[5, 6, 7, 0, 1, 2], [5, 6, 7, 0, 0, 3], [5, 6, 7, 4, 4, 4]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    # generate's positions (mask cumsum - 1) continue each row from the prefix as if there were no padding
    pos = (enc["attention_mask"].cumsum(-1) - 1).tolist()
    assert [p[-1] for p in pos] == [len(x) - 1 for x in ids]
