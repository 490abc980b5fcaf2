"""Routing labels: per prompt, a score in [0, 1] for each candidate model, and which part of the data it is in.

- source = file: any table with a prompt column and one score column per model (N >= 2 models).
- source = pipeline: the teacher records (collect) and the distilled student's generations (distill) on the
  val and test prompts, each scored against the gold reference or the teacher's answer. The "student
  suffices" flag and the quality gap (teacher - student) are kept beside the scores for the report.

Parts: `fit` (train the router), `cal` (calibrate its threshold), `test` (held out for the report).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.errors import OptkitError
from toolkit.collect.prompts import read_data
from toolkit.io import read_jsonl, require_columns

STUDENT, TEACHER = "student", "teacher"


@dataclass
class LabelTable:
    ids: list[str]
    prompts: list[str]
    scores: np.ndarray  # [n, M] float64 in [0, 1]
    models: list[str]
    part: np.ndarray  # [n] of "fit" | "cal" | "test"
    extra: dict[str, list] = field(default_factory=dict)  # per-row extras (pipeline: suffices, gap, origin)
    extra_records: list = field(default_factory=list)  # route.label_prompts' records (messages, student_output)

    def select(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.part == part)

    def rows(self) -> list[dict]:
        out = []
        for i in range(len(self.ids)):
            row = {"id": self.ids[i], "part": str(self.part[i]), "prompt": self.prompts[i],
                   "scores": {m: float(self.scores[i, j]) for j, m in enumerate(self.models)}}
            row.update({k: v[i] for k, v in self.extra.items()})
            out.append(row)
        return out

    def digest(self, part: Optional[str] = None) -> str:
        """sha256 of the (id, prompt, scores) rows of one part: recorded as the calibration-data hash."""
        h = hashlib.sha256()
        idx = range(len(self.ids)) if part is None else self.select(part)
        for i in idx:
            h.update(f"{self.ids[i]}\x1f{self.prompts[i]}\x1f{self.scores[i].tolist()}\n".encode())
        return h.hexdigest()


def hash_unit(key: str, seed: int) -> float:
    """A deterministic uniform number in [0, 1) per key and seed (splits that do not move when rows are added)."""
    digest = hashlib.sha256(f"{seed}:route:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _to_score(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return float(low == "true")
        try:
            value = float(low)
        except ValueError:
            raise OptkitError(f"{where}: score '{value}' is not a number or boolean") from None
    if value is None or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise OptkitError(f"{where}: score {value!r} is missing or not a number")
    if not 0 <= value <= 1:
        raise OptkitError(f"{where}: score {value} is outside [0, 1]")
    return float(value)


def from_file(cfg, recipe, seed: int) -> tuple[LabelTable, Path]:
    lab = cfg.labels
    if not lab.path:
        raise OptkitError("route.labels.path: required when route.labels.source = file")
    if len(lab.score_columns) < 2:
        raise OptkitError("route.labels.score_columns: name at least two models (model name -> score column)")
    path = recipe.resolve_path(lab.path)
    if not path.exists():
        raise OptkitError(f"route.labels.path: file not found: {path}")
    rows = read_data(path, field="route.labels.path")  # one line, not a traceback, on a non-UTF-8 or damaged file
    require_columns(rows, [lab.prompt_column], str(path), "route.labels.prompt_column")
    for model, col in lab.score_columns.items():
        require_columns(rows, [col], str(path), f"route.labels.score_columns.{model}")
    models = list(lab.score_columns)
    prompts, scores, ids = [], [], []
    for lineno, row in enumerate(rows, 1):
        for name, col in [("prompt_column", lab.prompt_column)] + [(f"score_columns.{m}", c)
                                                                   for m, c in lab.score_columns.items()]:
            if col not in row:  # the first row has it (require_columns): a later one may not
                raise OptkitError(f"{path}: row {lineno}: no column '{col}' (route.labels.{name})")
        prompt = row[lab.prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise OptkitError(f"{path}: row {lineno}: empty or non-text prompt in column '{lab.prompt_column}'")
        prompts.append(prompt)
        scores.append([_to_score(row[lab.score_columns[m]], f"{path}: row {lineno}: column "
                                 f"'{lab.score_columns[m]}'") for m in models])
        ids.append(str(row.get("id", lineno)))
    # A prompt repeated under another id goes where its first copy went: split by id alone, copies of one
    # question landed in fit and test (mmlu_routing_10k: 22 of its 50 repeated prompts).
    first: dict[str, str] = {}
    part = np.array([_assign(first.setdefault(" ".join(p.split()), i), cfg, seed) for i, p in zip(ids, prompts)],
                    dtype=object)
    return LabelTable(ids, prompts, np.asarray(scores, dtype=np.float64), models, part), path


def _assign(key: str, cfg, seed: int) -> str:
    u = hash_unit(key, seed)
    if u < cfg.holdout:
        return "test"
    # the rest, rescaled to [0, 1): its first `calibration` share calibrates
    return "cal" if (u - cfg.holdout) / (1 - cfg.holdout) < cfg.calibration else "fit"


def _score_fn(metric: str, labels: list[str]):
    from toolkit.metrics import exact_match, gold_match, token_f1

    if metric == "gold":
        return lambda out, ref, teacher: gold_match(out, ref, labels)
    if metric == "agreement_f1":
        return lambda out, ref, teacher: token_f1(out, teacher)
    return lambda out, ref, teacher: exact_match(out, teacher)


def from_pipeline(cfg, collect_dir: Path, distill_dir: Path, seed: int, extra: list[dict] = ()) -> LabelTable:
    """Student vs teacher on the val and test prompts: val is split into fit / cal, test is held out. `extra`:
    more train/val-split records with their `student_output` (route.label_prompts), split into fit / cal like val."""
    from toolkit.records import load_records

    records = load_records(collect_dir, splits=("val", "test"))
    student_path = Path(distill_dir) / "student_outputs.jsonl"
    if not student_path.is_file():
        raise OptkitError(f"route.labels.source=pipeline: {student_path} is missing (the distill stage writes "
                          "the student's generations for every val and test prompt)")
    student = {r["id"]: r for r in read_jsonl(student_path)}
    records = [r for r in records if r["id"] in student]
    origin = {r["id"]: "val_test" for r in records}
    for r in extra:
        if r["split"] == "test" or r["id"] in origin:  # never a test prompt, never a prompt twice
            raise OptkitError(f"route.label_prompts: prompt {r['id']} is a test or already labeled prompt")
        student[r["id"]] = {"id": r["id"], "output": r["student_output"]}
        records.append(r)
        origin[r["id"]] = "label_prompts"
    if not records:
        raise OptkitError(f"route.labels.source=pipeline: no val/test prompt of {collect_dir} has a student "
                          f"output in {student_path}")
    metric = cfg.labels.metric
    refs = sorted({r["reference"] for r in records if r.get("reference")})
    if metric == "gold" and not refs:
        raise OptkitError("route.labels.metric=gold: the collected prompts have no reference answers "
                          "(set data.reference_column, or use metric agreement_f1 / agreement_exact)")
    score = _score_fn(metric, refs)
    ids, prompts, S, parts, suffices, gaps, origins = [], [], [], [], [], [], []
    for r in records:
        out_s = student[r["id"]]["output"]
        t = 1.0 if metric != "gold" else score(r["output"], r["reference"] or "", r["output"])
        s = score(out_s, r.get("reference") or "", r["output"])
        ids.append(r["id"])
        prompts.append(r["prompt"])
        S.append([s, t])
        suffices.append(bool(s >= t * cfg.labels.suffices_at))
        gaps.append(t - s)
        origins.append(origin[r["id"]])
        if r["split"] == "test":
            parts.append("test")
        else:
            parts.append("cal" if hash_unit(r["id"], seed) < cfg.calibration else "fit")
    return LabelTable(ids, prompts, np.asarray(S, dtype=np.float64), [STUDENT, TEACHER],
                      np.array(parts, dtype=object), {"student_suffices": suffices, "gap": gaps, "origin": origins},
                      list(extra))


def check_learnable(table: LabelTable, strong: int) -> None:
    """Single-class labels (the strong model is never better, or always by the same margin) teach nothing."""
    for part in ("fit", "cal", "test"):  # test: the held-out check the report states its guarantee on
        if not len(table.select(part)):
            raise OptkitError(f"route: no labeled prompts fall in the '{part}' part "
                              f"({len(table.ids)} labeled in all); add data or change route.calibration / "
                              "route.holdout (or the recipe's test split)")
    S = table.scores[table.select("fit")]
    if S.shape[1] == 2:
        gap = S[:, strong] - S[:, 1 - strong]
        if np.all(gap == gap[0]):
            raise OptkitError(f"route.labels: single-class labels: on all {len(gap)} training prompts the strong "
                              f"model's score minus the other's is {gap[0]:g}; a router cannot learn anything "
                              "(check the score columns / metric, or add varied prompts)")
    elif np.all(S == S[0]):
        raise OptkitError(f"route.labels: single-class labels: every model has the same score on all {len(S)} "
                          "training prompts")
