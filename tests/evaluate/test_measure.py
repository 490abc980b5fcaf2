"""The metric arithmetic on hand-checked numbers (fast; the stage tests exercise it on real models)."""

from __future__ import annotations

import pytest

from toolkit.config import Price
from toolkit.evaluate.engines import Timed
from toolkit.evaluate.measure import agrees, best_rps, latency_summary, request_cost, task_score, variant_cost

LABELS = ["ORDER", "REFUND", "SHIPPING_ADDRESS"]


def test_tpot_follows_vllm_and_excludes_the_first_token():
    # 1 s to the first token, then 4 more tokens in 2 s: TPOT = 2 / 4 = 0.5 s (GuideLLM's TPOT would be 3 / 5).
    t = latency_summary([Timed(ttft_s=1.0, e2e_s=3.0, output_tokens=5, itl_s=[0.5] * 4)])
    assert t["ttft_p50_s"] == 1.0 and t["tpot_p50_s"] == 0.5 and t["e2e_p50_s"] == 3.0
    assert t["tokens_per_s_b1"] == pytest.approx(5 / 3) and t["itl_p50_s"] == 0.5


def test_percentiles_over_requests():
    timed = [Timed(0.1, float(i), 2, [0.1]) for i in range(1, 101)]
    t = latency_summary(timed)
    assert t["e2e_p50_s"] == pytest.approx(50.5) and t["e2e_p99_s"] == pytest.approx(99.01)


def test_api_cost_with_prompt_caching():
    price = Price(input_per_1m=1.0, output_per_1m=4.0, cached_input_per_1m=0.25)
    # 1000 input tokens, half cached: 500 * 1 + 500 * 0.25 + 100 * 4 = 1025 micro-dollars.
    assert request_cost(price, 1000, 100, 0.5) == pytest.approx(1025e-6)
    no_cache_price = Price(input_per_1m=1.0, output_per_1m=4.0)
    assert request_cost(no_cache_price, 1000, 100, 0.5) == pytest.approx(1400e-6)


def test_self_hosted_cost_uses_the_largest_batch():
    row = {"requests_per_s_b1": 2.0, "requests_per_s_b8": 10.0}
    assert best_rps(row) == (10.0, 8)
    cost = variant_cost(row, Price(per_hour=3.6), "student", [], 0.0)
    assert cost["cost_per_1m_requests"] == pytest.approx(3.6 / 3600 / 10 * 1e6)  # $100 per 1M requests
    assert best_rps({"requests_per_s_collect": 4.0}) == (4.0, None)
    assert variant_cost({}, None, None, [], 0.0)["cost_per_1m_requests"] is None


def test_gold_and_agreement_use_the_first_label():
    assert task_score("The category is REFUND, not ORDER", "REFUND", "gold", LABELS) == 1.0
    assert task_score("ORDER or REFUND", "REFUND", "gold", LABELS) == 0.0
    assert task_score("anything", None, "gold", LABELS) is None
    assert agrees("refund please", "It is REFUND.", LABELS) == 1.0
    assert agrees("ORDER", "REFUND", LABELS) == 0.0
    assert agrees("hello there", "Hello, there!", None) == 1.0
