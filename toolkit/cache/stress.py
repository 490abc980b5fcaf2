"""A built-in stress set: pairs that embed close together but must not share an answer (negation, a different
number, a different name or place), and harmless edits that should (typos, punctuation, politeness).

Reported separately from the calibration pairs: these are adversarial by construction, so they say where a
cosine threshold is blind, not how often it errs on real traffic. Written for this project (no source data).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# category -> (label, [(query, cached query), ...]); label 1 = the cached answer may be reused
PAIRS: dict[str, tuple[int, list[tuple[str, str]]]] = {
    "negation": (0, [
        ("can I cancel my order", "can't I cancel my order"),
        ("I want to cancel my subscription", "I don't want to cancel my subscription"),
        ("is my card blocked", "is my card not blocked"),
        ("should I update my address", "should I not update my address"),
        ("the package has arrived", "the package has not arrived"),
        ("I received a refund", "I never received a refund"),
        ("my payment went through", "my payment did not go through"),
        ("I can log in to my account", "I cannot log in to my account"),
        ("is the store open on Sunday", "is the store closed on Sunday"),
        ("I agree to the new terms", "I do not agree to the new terms"),
        ("does the plan include roaming", "does the plan exclude roaming"),
        ("I want email notifications", "I want no email notifications"),
    ]),
    "number": (0, [
        ("transfer $50 to my savings account", "transfer $500 to my savings account"),
        ("set an alarm for 6 am", "set an alarm for 7 am"),
        ("book a table for 2 people", "book a table for 8 people"),
        ("what is 15 percent of 80", "what is 15 percent of 90"),
        ("order 3 boxes of printer paper", "order 30 boxes of printer paper"),
        ("convert 10 miles to kilometers", "convert 100 miles to kilometers"),
        ("remind me in 5 minutes", "remind me in 50 minutes"),
        ("my flight is on March 3", "my flight is on March 13"),
        ("pay the bill of 120 euros", "pay the bill of 210 euros"),
        ("what's the status of order 48213", "what's the status of order 48231"),
        ("set the thermostat to 68 degrees", "set the thermostat to 76 degrees"),
        ("I need 2 tickets for tonight", "I need 4 tickets for tonight"),
    ]),
    "name": (0, [
        ("send 20 dollars to Anna", "send 20 dollars to Maria"),
        ("what's the weather in Paris", "what's the weather in Berlin"),
        ("call my mom", "call my boss"),
        ("book a flight to Tokyo", "book a flight to Toronto"),
        ("what time is it in London", "what time is it in Sydney"),
        ("play songs by Adele", "play songs by Metallica"),
        ("how do I get to Central Station", "how do I get to Central Park"),
        ("text John that I'm late", "text Peter that I'm late"),
        ("translate hello into Spanish", "translate hello into Japanese"),
        ("what is the capital of Austria", "what is the capital of Australia"),
        ("is my Visa card accepted", "is my Amex card accepted"),
        ("check the price of Apple stock", "check the price of Tesla stock"),
    ]),
    "small_edit": (1, [
        ("how do I reset my password", "how do i reset my pasword?"),
        ("where is my order", "Where is my order??"),
        ("cancel my subscription please", "please cancel my subscription"),
        ("what are your opening hours", "what are your opening hours today"),
        ("I want to change my shipping address", "i want to change my shipping adress"),
        ("how can I contact customer support", "how can I contact customer support?"),
        ("track my package", "track my parcel"),
        ("I forgot my password", "I forgot my password, help"),
        ("how do I get a refund", "how do I get a refund?"),
        ("can you help me update my billing info", "could you help me update my billing info"),
        ("what payment methods do you accept", "which payment methods do you accept"),
        ("delete my account", "delete my acount"),
    ]),
}


def pairs() -> list[dict]:
    return [{"category": cat, "query": q, "cached_query": c, "label": label}
            for cat, (label, items) in PAIRS.items() for q, c in items]


def report(sims: np.ndarray, threshold: Optional[float]) -> dict:
    """Per category: how many pairs would be served at the threshold (false hits for label-0 categories)."""
    rows = pairs()
    sims = np.asarray(sims, dtype=np.float64)
    out = {}
    for cat, (label, _) in PAIRS.items():
        idx = [i for i, r in enumerate(rows) if r["category"] == cat]
        s = sims[idx]
        served = int((s >= threshold).sum()) if threshold is not None else 0
        out[cat] = {"label": label, "pairs": len(idx), "served": served, "served_rate": served / len(idx),
                    "mean_similarity": float(s.mean()), "min_similarity": float(s.min()),
                    "max_similarity": float(s.max()),
                    "meaning": "false hits (answer not reusable)" if label == 0 else "hits (answer reusable)"}
    return out
