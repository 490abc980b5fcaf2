"""Cascade mode (route.mode: cascade): the student answers first; its confidence in its own answer (the mean or
minimum log-prob of the answer's tokens) decides whether the teacher answers instead ("escalation").

The escalation threshold is calibrated exactly like the pre-generation router's (toolkit/route/calibrate.py, the
same one-sided bound on the quality a batch of target.eval_size prompts realizes, fixed-sequence testing from
"always escalate" towards cheaper): the router's score is replaced by -confidence, so "strong iff score >= lam"
reads "escalate iff confidence <= -lam". The shipped rule is "escalate iff confidence < threshold" with the
threshold put half-way to the next calibration confidence above -lam (the same calibration decisions; an unseen
confidence in the gap escalates, the cautious side). Cost per query = the student always + the teacher on
escalations; latency adds both on an escalation.

Runtime part (Cascade, token_logprobs_of, confidence_of) imports numpy only; the calibration and the stage helper
import scipy / the engines inside their functions. Files: cascade.json (validated, strict JSON) next to
router.json, and cascade_confidence.jsonl (id, part, confidence of the student's answer) for evaluate's replay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.errors import OptkitError

CASCADE_JSON, CONFIDENCE_JSONL = "cascade.json", "cascade_confidence.jsonl"
FORMAT = "optkit-cascade/1"
CONFIDENCES = ("mean_logprob", "min_logprob")
RULE = "escalate to the strong model iff confidence < threshold (confidence of the weak model's own answer)"


# ------------------------------------------------------------------------------------------------ runtime


def confidence_of(token_logprobs: Optional[list], kind: str = "mean_logprob") -> float:
    """Mean (or min) log-prob of the answer's tokens; no tokens or a non-finite value -> -inf (escalate)."""
    if not token_logprobs:
        return float("-inf")
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if not np.all(np.isfinite(lp)):
        return float("-inf")
    return float(lp.mean() if kind == "mean_logprob" else lp.min())


def token_logprobs_of(reply) -> Optional[list[float]]:
    """The sampled tokens' log-probs of an OpenAI-style reply: chat (choices[0].logprobs.content[].logprob) or
    completions (choices[0].logprobs.token_logprobs); None when the reply carries none."""
    try:
        lp = reply["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):
        vals = [t.get("logprob") if isinstance(t, dict) else None for t in lp["content"]]
    elif isinstance(lp.get("token_logprobs"), list):
        vals = list(lp["token_logprobs"])
    else:
        return None
    vals = [v for v in vals if v is not None]  # completions: the first prompt token may carry null
    if not all(isinstance(v, (int, float)) for v in vals):
        return None
    return [float(v) for v in vals]


def escalates(confidence: float, threshold: float) -> bool:
    """The one escalation rule (gateway, replay, tests): a NaN confidence escalates."""
    return not (confidence >= threshold)


class Cascade:
    """cascade.json as the gateway and evaluate use it: `decide(token_logprobs)` -> (confidence, escalate)."""

    def __init__(self, spec: dict, where: str = CASCADE_JSON):
        check_cascade(spec, where)
        self.spec = spec
        self.threshold = float(spec["threshold"])
        self.kind = spec["confidence"]
        self.weak, self.strong = spec["weak"], spec["strong"]

    @classmethod
    def load(cls, path) -> "Cascade":
        path = Path(path)
        path = path / CASCADE_JSON if path.is_dir() else path
        try:
            spec = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
        except FileNotFoundError:
            raise OptkitError(f"{path}: no cascade file (route.mode: cascade writes it)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise OptkitError(f"{path}: not a valid cascade file (strict JSON): {str(exc)[:120]}") from None
        return cls(spec, str(path))

    def confidence(self, token_logprobs: Optional[list]) -> float:
        return confidence_of(token_logprobs, self.kind)

    def escalate(self, confidence: float) -> bool:
        return escalates(confidence, self.threshold)

    def decide(self, token_logprobs: Optional[list]) -> tuple[float, bool]:
        c = self.confidence(token_logprobs)
        return c, self.escalate(c)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_cascade(spec, where: str) -> None:
    """One-line OptkitError for anything load must refuse."""
    if not isinstance(spec, dict):
        raise OptkitError(f"{where}: a cascade file holds a JSON object")
    if spec.get("format") != FORMAT:
        raise OptkitError(f"{where}: format {spec.get('format')!r} is not {FORMAT!r}")
    if spec.get("confidence") not in CONFIDENCES:
        raise OptkitError(f"{where}: confidence {spec.get('confidence')!r} is not one of {', '.join(CONFIDENCES)}")
    t = spec.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise OptkitError(f"{where}: threshold {t!r} is not a finite number")
    for key in ("weak", "strong"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise OptkitError(f"{where}: '{key}' must name a model")


# ------------------------------------------------------------------------------------------------ calibration


def calibrate_cascade(conf: np.ndarray, S: np.ndarray, strong: int, target):
    """conf [n] confidences of the weak model's answers, S [n, 2] true scores (weak, strong by index), target a
    RouteTargetConfig -> (threshold, Calibration at it). Same bound and goals as the router's calibration."""
    from toolkit.route.calibrate import calibrate

    conf = np.asarray(conf, dtype=np.float64)
    conf = np.where(np.isfinite(conf), conf, -1e9)  # no answer tokens: the least confident of all
    P = np.zeros((len(conf), 2))
    P[:, strong] = -conf  # score = P[strong] - P[weak] = -confidence
    cost_norm = np.zeros(2)
    cost_norm[strong] = 1.0
    cal = calibrate(P, np.asarray(S, dtype=np.float64), cost_norm, strong, target)
    edge = -cal.threshold  # escalate iff conf <= edge
    above = conf[conf > edge]
    threshold = float((edge + above.min()) / 2) if len(above) else float(edge + 1.0)
    assert np.array_equal(conf <= edge, ~(conf >= threshold))
    return threshold, cal


def at_threshold(conf: np.ndarray, S: np.ndarray, strong: int, threshold: float, costs: dict,
                 models: list[str]) -> dict:
    """Quality ratio (vs always-strong), escalation share and cost of the cascade on labeled prompts."""
    esc = np.array([escalates(float(c), threshold) for c in conf], dtype=bool)
    weak = 1 - strong
    q = np.where(esc, S[:, strong], S[:, weak])
    q_strong = S[:, strong].mean()
    c_weak, c_strong = costs[models[weak]], costs[models[strong]]
    span = (c_strong - c_weak) or 1.0
    per_query = c_weak + esc.mean() * c_strong  # the student always runs; the teacher on escalations
    return {"n": int(len(conf)), "quality_ratio": float(q.mean() / q_strong) if q_strong > 0 else None,
            "quality": float(q.mean()), "escalation_fraction": float(esc.mean()),
            "cost_per_query": float(per_query), "cost": float((per_query - c_weak) / span)}


# ------------------------------------------------------------------------------------------------ stage


def student_confidences(ctx, table, kind: str) -> dict[str, float]:
    """Confidence of the distilled student's answer (distill/student_outputs.jsonl) on every cal/test prompt:
    the student model re-reads prompt + its answer (teacher forcing through toolkit.engines; greedy answers, so
    these are the log-probs it generated them with). The end-of-turn token is not counted (servers do not
    return it)."""
    from toolkit.engines import HFEngine
    from toolkit.io import read_jsonl
    from toolkit.records import load_records

    distill = Path(ctx.upstream("distill"))
    model_dir = distill / "model"
    if not model_dir.is_dir():
        raise OptkitError(f"route.mode=cascade: {model_dir} is missing (the distill stage publishes the student)")
    wanted = set(table.ids[i] for i in np.flatnonzero(table.part != "fit"))
    messages = {r["id"]: r["messages"] for r in load_records(ctx.upstream("collect"), splits=("val", "test"))
                if r["id"] in wanted}
    answers = {r["id"]: r["output"] for r in read_jsonl(distill / "student_outputs.jsonl") if r["id"] in wanted}
    for r in table.extra_records:  # route.label_prompts' prompts: their messages and the student's answers
        if r["id"] in wanted:
            messages[r["id"]], answers[r["id"]] = r["messages"], r["student_output"]
    # at the precision the student's answers were generated at (distill.eval_dtype)
    engine = HFEngine.load(model_dir, chat_template=ctx.recipe.data.chat_template,
                           dtype=ctx.recipe.distill.eval_dtype, device="cpu")
    ids = sorted(i for i in wanted if i in messages and i in answers)
    seqs, keep = [], []
    for i in ids:
        answer = engine.renderer.answer_ids(answers[i], "length")  # "length": no end-of-turn token appended
        if answer:
            seqs.append((engine.renderer.prompt(messages[i]).ids + answer, len(engine.renderer.prompt(messages[i]).ids)))
            keep.append(i)
    nll = engine.token_nll(seqs) if seqs else []
    engine.close()
    out = {i: float("-inf") for i in ids}
    out.update({i: confidence_of([-x for x in row], kind) for i, row in zip(keep, nll)})
    return out


def run_cascade(ctx, table, s_idx: int, costs: dict, router_at_test: dict) -> dict:
    """Calibrate the cascade on the cal part, report it on the test part beside the router, write cascade.json
    and cascade_confidence.jsonl into the stage dir; returns the report section."""
    from toolkit.io import atomic_write_json, write_jsonl

    cfg = ctx.config
    if cfg.labels.source != "pipeline" or len(table.models) != 2:
        raise OptkitError("route.mode=cascade needs route.labels.source=pipeline (the student's own answers give "
                          "its confidence)")
    conf_by_id = student_confidences(ctx, table, cfg.cascade.confidence)
    conf = np.array([conf_by_id.get(i, float("-inf")) for i in table.ids])
    cal_idx, test_idx = table.select("cal"), table.select("test")
    threshold, cal = calibrate_cascade(conf[cal_idx], table.scores[cal_idx], s_idx, cfg.target)
    models = table.models
    section = {"mode": "cascade", "confidence": cfg.cascade.confidence, "threshold": threshold,
               "calibration": {**cal.as_dict(), "threshold": threshold, "data_sha256": table.digest("cal"),
                               **at_threshold(conf[cal_idx], table.scores[cal_idx], s_idx, threshold, costs, models)}}
    if len(test_idx):
        section["test"] = at_threshold(conf[test_idx], table.scores[test_idx], s_idx, threshold, costs, models)
        section["router_test"] = router_at_test
    spec = {"format": FORMAT, "confidence": cfg.cascade.confidence, "threshold": threshold, "rule": RULE,
            "weak": models[1 - s_idx], "strong": models[s_idx], "costs": costs,
            "calibration": section["calibration"], "test": section.get("test")}
    check_cascade(spec, CASCADE_JSON)
    write_jsonl(ctx.dir / CONFIDENCE_JSONL, [{"id": i, "part": str(p), "confidence": c if math.isfinite(c) else None}
                                             for i, p, c in zip(table.ids, table.part, conf) if p != "fit"])
    atomic_write_json(ctx.dir / CASCADE_JSON, spec)
    return section
