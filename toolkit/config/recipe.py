"""The whole recipe: every stage section, optional; secrets stripped for anything written out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field, SecretStr, model_validator

from toolkit.config.base import STAGE_ORDER, Section
from toolkit.config.cache import CacheConfig
from toolkit.config.collect import CollectConfig
from toolkit.config.common import DataConfig, ModelSpec, Price, RuntimeConfig, TrackingConfig
from toolkit.config.distill import DistillConfig
from toolkit.config.evaluate import EvaluateConfig
from toolkit.config.export import ExportConfig
from toolkit.config.quantize import QuantizeConfig
from toolkit.config.route import RouteConfig
from toolkit.redact import redact_data


class Recipe(Section):
    name: str = Field(description="Run name; artifacts go to <artifacts_dir>/<name>/.", pattern=r"^[A-Za-z0-9_.-]+$")
    description: Optional[str] = Field(None, description="Free text for the run's README and MLflow.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    artifacts_dir: str = Field("artifacts", description="Where run directories go (relative to the working dir).")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Process-level settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow settings.")
    teacher: Optional[ModelSpec] = Field(None, description="The big model whose outputs we learn from (needed by "
                                         "collect, distill and evaluate).")
    data: Optional[DataConfig] = Field(None, description="The prompts (needed by collect, distill, quantize, "
                                       "evaluate, and cache without cache.pairs_path).")
    pricing: dict[str, Price] = Field(default_factory=dict, description="Model/variant name -> prices "
                                      "(keys: teacher, student, or any variant name).")
    collect: Optional[CollectConfig] = Field(None, description="Collect teacher outputs.")
    distill: Optional[DistillConfig] = Field(None, description="Train a student on them.")
    quantize: Optional[QuantizeConfig] = Field(None, description="Quantize the student.")
    route: Optional[RouteConfig] = Field(None, description="Train and calibrate a router.")
    cache: Optional[CacheConfig] = Field(None, description="Tune a semantic-cache threshold.")
    evaluate: Optional[EvaluateConfig] = Field(None, description="Evaluate every variant and the system.")
    export: Optional[ExportConfig] = Field(None, description="Write the deployable bundle.")

    # Where the recipe file lives; relative data paths resolve against it. Not part of the schema.
    _base_dir: Path = Path(".")

    def stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    def public_dict(self) -> dict[str, Any]:
        """The recipe as plain data for files, params and logs: secret fields removed, credentials in URLs
        (`http://user:pw@host`, `?api_key=`) masked."""
        return redact_data(_strip_secrets(self))

    @model_validator(mode="after")
    def _stages_fit_together(self) -> "Recipe":
        """What `run` would refuse from the recipe alone, refused by `validate` already."""
        problems = missing_sections(self)
        problems += [msg for cond, msg in (
            (self.distill is not None and self.collect is None,
             "distill: trains on the teacher's outputs, so the recipe needs a collect section"),
            (self.route is not None and self.route.labels.source == "pipeline"
             and (self.collect is None or self.distill is None),
             "route.labels.source: pipeline labels prompts with the collect and distill outputs, so the recipe "
             "needs both sections (or use route.labels.source: file)"),
            (self.evaluate is not None and self.collect is None,
             "evaluate: scores variants on the collected held-out prompts, so the recipe needs a collect section"),
            (self.route is not None and self.route.mode == "cascade" and self.evaluate is not None
             and self.evaluate.system.student != "student",
             "evaluate.system.student: route.mode cascade escalates on the distilled student's confidence in its own "
             "answers (route/cascade_confidence.jsonl), so the system's student must be 'student'"),
            (self.quantize is not None and not self.quantize.enabled_methods(),
             f"quantize: no method enabled; add one of {', '.join(QuantizeConfig.method_names())} to the quantize "
             "section"),
        ) if cond]
        if problems:
            raise ValueError("\n".join(problems))  # one line each (toolkit.config.loading prefixes every line)
        return self


# The shared sections each stage reads (besides its own section and upstream stages). A route-only or cache-only
# recipe needs neither teacher nor data; a stage listed here refuses to validate without them.
NEEDS: dict[str, tuple[str, ...]] = {
    "collect": ("teacher", "data"),  # the prompts and who answers them (backend log: the teacher's name, data too)
    "distill": ("teacher", "data"),  # the student starts from / is scored against the teacher, on the prompts
    "quantize": ("data",),  # calibration and held-out prompts
    "evaluate": ("teacher", "data"),  # the teacher variant, the held-out prompts
}
WHY = {"teacher": "the teacher model", "data": "the prompts"}


def stage_needs(recipe: "Recipe", stage: str) -> tuple[str, ...]:
    """Shared sections `stage` reads in this recipe (cache reads data only when it builds pairs from it)."""
    if stage == "cache":
        return () if recipe.cache.pairs_path else ("data",)
    return NEEDS.get(stage, ())


def missing_sections(recipe: "Recipe") -> list[str]:
    """One message per present stage whose shared sections are absent, naming the stage and the section."""
    out = []
    for stage in recipe.stages():
        for section in stage_needs(recipe, stage):
            if getattr(recipe, section) is None:
                hint = (" (or set cache.pairs_path to tune on a labeled pairs file)" if stage == "cache" else "")
                out.append(f"{stage}: needs the '{section}' section ({WHY[section]}), which the recipe lacks{hint}")
    return out


def _strip_secrets(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("secret"):
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _strip_secrets(value)
        elif isinstance(value, dict):
            out[name] = {k: _strip_secrets(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
        elif isinstance(value, SecretStr):
            continue
        else:
            out[name] = value
    return out


def config_hash(obj: Any) -> str:
    """Stable hash of plain data (dict/list/scalars), used to decide whether a stage can be skipped."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
