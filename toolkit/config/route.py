"""route: labels, calibration target and router model."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, NonNegativeFloat, SecretStr, model_validator

from toolkit.config.base import Section
from toolkit.route import routers  # names only (imports nothing): the choices below come from the registry

# The recipe's choices, built from toolkit.route.routers when this module is imported: a new router model is a
# module + a line there, never an edit here.
RouterModel = Literal[tuple(routers.ROUTERS)]
RouterCandidate = Literal[tuple(routers.names())]


class RouteLabelsConfig(Section):
    source: Literal["pipeline", "file"] = Field(
        "pipeline", description="pipeline = label the val/test prompts by the distilled student's quality vs the "
        "teacher's (needs collect + distill); file = a labeled file with per-model scores.")
    path: Optional[str] = Field(None, description="Labeled file (jsonl/csv/parquet) when source = file; relative "
                                "to the recipe file.")
    prompt_column: str = Field("prompt", description="Prompt column of the labeled file.")
    score_columns: dict[str, str] = Field(default_factory=dict, description="source = file: model name -> column "
                                          "holding that model's correctness/score in [0, 1] per prompt (2 or more "
                                          "models; booleans count as 0/1).")
    metric: Literal["gold", "agreement_f1", "agreement_exact"] = Field(
        "gold", description="source = pipeline: how answers are scored. gold = names the reference label (label "
        "set = distinct references); agreement_* = the student's token F1 / exact match with the teacher "
        "(the teacher scores 1).")
    suffices_at: float = Field(1.0, ge=0, description="source = pipeline: the student 'suffices' on a prompt when "
                               "its score >= the teacher's score * this (reported as a label beside the gap).")


class RouteLabelPromptsConfig(Section):
    rows: Literal["none", "unsampled"] = Field(
        "none", description="source = pipeline: extra prompts the route stage has the teacher and the student "
        "answer, scored like val and added to the fit / calibration parts. unsampled = the data rows data.limit "
        "left out of the collected sample, train or val split only (never a test-split row; never the sample's "
        "train rows, which the student learned). Answers are cached in route/work/ (a re-run asks only what is "
        "missing).")
    max: Optional[int] = Field(None, ge=1, description="At most this many extra prompts (a stable hash sample); "
                               "each costs one teacher and one student generation. Default: all.")


class RouteTargetConfig(Section):
    min_quality: Optional[float] = Field(None, gt=0, le=1, description="Keep at least this fraction of the "
                                         "strong model's quality: the cheapest threshold whose one-sided lower "
                                         "confidence bound on calibration data is >= this.")
    max_strong_fraction: Optional[float] = Field(None, ge=0, le=1, description="Send at most this fraction "
                                                 "of queries to the strong model (best quality within it).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the quality bound.")
    eval_size: Optional[int] = Field(None, ge=1, description="min_quality: the guarantee is for the quality "
                                     "REALIZED on a batch of this many prompts (a deployment window or an "
                                     "evaluation set), not only the long-run mean; smaller = stricter threshold. "
                                     "Default: the calibration size.")

    @model_validator(mode="after")
    def _one_goal(self) -> "RouteTargetConfig":
        if (self.min_quality is None) == (self.max_strong_fraction is None):
            raise ValueError("set exactly one of 'min_quality' or 'max_strong_fraction'")
        return self


class RouteShiftConfig(Section):
    enabled: bool = Field(True, description="Calibrate a shift guard: flag prompts far from the router's training "
                          "prompts (distance to the k nearest), at most `alpha` of in-distribution prompts flagged.")
    alpha: float = Field(0.01, gt=0, lt=1, description="Share of in-distribution prompts the guard may flag "
                         "(split-conformal threshold on the calibration part).")
    k: int = Field(10, ge=1, description="Nearest training prompts averaged in the guard's distance.")
    action: Literal["strong", "warn"] = Field("strong", description="Flagged prompts: strong = send to the strong "
                                              "model; warn = route as usual, count and report them.")
    max_reference: int = Field(5000, ge=10, description="Training embeddings kept as the guard's reference "
                               "(uniform subsample beyond this).")
    eval_path: Optional[str] = Field(None, description="Optional out-of-distribution set (jsonl/csv/parquet, "
                                     "relative to the recipe) the report evaluates the guard on; with the label "
                                     "score columns present, quality too.")
    eval_prompt_column: Optional[str] = Field(None, description="Prompt column of eval_path (default: "
                                              "route.labels.prompt_column).")


class RouteCascadeConfig(Section):
    confidence: Literal["mean_logprob", "min_logprob"] = Field(
        "mean_logprob", description="mode = cascade: the student's confidence in its own answer = the mean (or "
        "minimum) log-prob of its answer tokens; below the calibrated threshold the teacher answers instead.")


class RouteConfig(Section):
    mode: Literal["router", "cascade"] = Field(
        "router", description="router = decide before generation from the prompt; cascade = the student answers "
        "first and escalates to the teacher when its confidence (route.cascade) is below a threshold calibrated "
        "to route.target like the router's (labels.source = pipeline; the router is still trained and reported "
        "beside it). The bundle's gateway runs the mode exported.")
    cascade: RouteCascadeConfig = Field(default_factory=RouteCascadeConfig, description="Cascade settings.")
    labels: RouteLabelsConfig = Field(default_factory=RouteLabelsConfig, description="Where labels come from.")
    label_prompts: RouteLabelPromptsConfig = Field(default_factory=RouteLabelPromptsConfig,
                                                   description="More labeled prompts than the val split (pipeline).")
    embedder: str = Field("minilm-l6", description="sentence-transformers model for features (built-in name, "
                          "local dir or Hub id).")
    embedding: Literal["transformer", "static"] = Field(
        "transformer", description="transformer = run the embedder on every prompt; static = distill the embedder "
        "once into per-token vectors and average them (model2vec-style: ~100x faster, no torch when serving; "
        "the vectors ship in the route dir).")
    max_seq_length: int = Field(256, ge=8, description="Embedder truncation in tokens (shorter = faster routing).")
    text_features: bool = Field(True, description="Add cheap text features (length, digits, code, question words).")
    shift: RouteShiftConfig = Field(default_factory=RouteShiftConfig, description="Shift guard.")
    select: list[RouterCandidate] = Field(
        default_factory=lambda: ["logreg", "knn", "length", "constant"], description="Candidates compared with "
        "route.model by cross-validated APGR on the fit part; the best is exported. Baselines: "
        f"{routers.describe(routers.BASELINES)}. [] = export route.model.")
    cv_folds: int = Field(5, ge=2, description="Folds of the model-selection cross-validation.")
    model: RouterModel = Field(
        "logreg", description="Router model predicting each model's quality per prompt (toolkit/route/routers/): "
        f"{routers.describe(routers.ROUTERS)}.")
    k: Optional[int] = Field(None, ge=1, description="model = knn: neighbours averaged (default: 5% of the "
                             "training prompts, between 5 and 100).")
    hidden: int = Field(64, ge=1, description="model = mlp: hidden units; model = mf: latent dimension.")
    l2: Optional[float] = Field(None, gt=0, description="L2 penalty on the mean training loss (logreg, mlp, mf); "
                                "default per model (its module's L2: logreg 1.0, mlp 1.5e-3, mf 0.01), tuned on MMLU "
                                "routing labels.")
    costs: dict[str, NonNegativeFloat] = Field(
        default_factory=dict, description="Model name -> relative cost per query (every model must be listed). "
        "Default: from recipe pricing (input + output price per 1M tokens) when every model has one; else strong = "
        "1, others 0 (two models only).")
    strong: Optional[str] = Field(None, description="Name of the strong model (default: the costliest; for "
                                  "source = pipeline: teacher).")
    target: RouteTargetConfig = Field(default_factory=lambda: RouteTargetConfig(min_quality=0.95),
                                      description="Calibration goal.")
    holdout: float = Field(0.2, gt=0, lt=1, description="source = file: fraction of labeled prompts held out for "
                           "the report (source = pipeline uses the test split).")
    calibration: float = Field(0.3, gt=0, lt=1, description="Fraction of the non-held-out prompts (pipeline: of "
                               "the val split) kept out of training to calibrate the threshold.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of held-out data used to check the quality "
                           "guarantee in the report (0 = skip).")
