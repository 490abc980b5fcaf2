"""What a router directory must hold, checked before a single prompt is routed.

`router.json` and `router.safetensors` are files: a hand edit, a truncated copy or a mixed-up bundle must not
turn into a router that silently sends every prompt to one model (a NaN threshold compares false with every
score; a cost vector of the wrong length broadcasts or crashes mid-request). Everything the runtime reads is
validated here with the rigour of a recipe (pydantic, extra keys forbidden, finite numbers, ranges, lengths,
tensor shapes), and anything off is one `OptkitError` line naming the file and the field.

Imports numpy and pydantic only: the gateway loads routers through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolkit.errors import OptkitError
from toolkit.route.runtime import ROUTER_JSON, ROUTER_WEIGHTS, TEXT_FEATURES, StaticEmbedder

# A router model's head name, head tensors and their shapes come from its module (toolkit/route/routers/:
# TENSORS, INTEGER_TENSORS, check). Symbols: dim = scaled feature width, E = embedding width, M = models; any other
# letter (H hidden, K stored prompts) is free but must agree across tensors.


def _router_module(name: str):
    from toolkit.route import routers

    try:
        return routers.load(name)
    except KeyError as exc:
        raise ValueError(f"model: {exc.args[0]}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class TensorInfo(_Strict):
    shape: list[int]
    dtype: str


class FeatureSpec(_Strict):
    embedder: str = Field(min_length=1)
    embedder_revision: Optional[str] = None
    embedding: Literal["transformer", "static"] = "transformer"
    static_files: list[str] = Field(default_factory=list)
    max_seq_length: int = Field(ge=1)
    normalize_embeddings: bool = True
    dim: int = Field(ge=1)
    text_features: bool
    text_feature_names: list[str] = Field(default_factory=list)
    order: list[str] = Field(default_factory=list)
    scaling: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureSpec":
        names = list(TEXT_FEATURES) if self.text_features else []
        if self.text_feature_names != names:
            raise ValueError(f"text_feature_names must be {names} when text_features is {self.text_features}")
        if self.dim <= len(names):
            raise ValueError(f"dim {self.dim} leaves no room for the embedding beside {len(names)} text features")
        files = sorted([StaticEmbedder.VECTORS, StaticEmbedder.TOKENIZER]) if self.embedding == "static" else []
        if sorted(self.static_files) != files:
            raise ValueError(f"static_files must be {files} when embedding is '{self.embedding}'")
        return self

    @property
    def embedding_dim(self) -> int:
        return self.dim - len(self.text_feature_names)


class ShiftSpec(_Strict):
    """The shift guard (toolkit/route/shift.py); its reference embeddings are the tensor shift.keys [R, E]."""
    method: Literal["knn_distance"]
    k: int = Field(ge=1)
    threshold: float
    text_threshold: Optional[float] = None  # with tensors shift.text_mean [T], shift.text_precision [T, T]
    alpha: float = Field(gt=0, lt=1)
    action: Literal["strong", "warn"]
    n_reference: int = Field(ge=1)
    n_calibration: int = Field(ge=1)
    calibration_flagged: float = Field(ge=0, le=1)
    reading: str = ""
    report: dict[str, Any] = Field(default_factory=dict)  # informational


class RouterSpec(_Strict):
    format_version: Literal[1]
    models: list[str] = Field(min_length=2)
    strong: str
    costs: dict[str, float]
    cost_norm: list[float]
    threshold: float  # required: a router on disk is calibrated (null = the stage never finished)
    threshold_units: str = ""
    quality_units: str = ""
    model: str  # a router model or baseline of toolkit.route.routers (checked against the live registry)
    head: str  # that model's head (its module's HEAD; older files name the same heads)
    knn_weights: Literal["uniform", "distance"] = "uniform"  # distance: weights sim_i - sim_(k+1) (continuous)
    shift: Optional[ShiftSpec] = None
    selection: dict[str, Any] = Field(default_factory=dict)  # informational: which candidate won and why
    features: FeatureSpec
    labels: dict[str, Any] = Field(default_factory=dict)  # informational (the report), not used to route
    calibration: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    tensors: dict[str, TensorInfo]

    @model_validator(mode="after")
    def _consistent(self) -> "RouterSpec":
        check_models(self)
        check_costs(self)
        check_threshold(self)
        head = _router_module(self.model).HEAD
        if head != self.head:
            raise ValueError(f"head: model '{self.model}' writes head '{head}', not '{self.head}'")
        return self


def check_models(spec: RouterSpec) -> None:
    if any(not m for m in spec.models) or len(set(spec.models)) != len(spec.models):
        raise ValueError(f"models: names must be non-empty and distinct, got {spec.models}")
    if spec.strong not in spec.models:
        raise ValueError(f"strong: '{spec.strong}' is not one of models {spec.models}")


def check_costs(spec: RouterSpec) -> None:
    """costs: one finite non-negative cost per model; cost_norm: the same costs scaled to [0, 1] (strong = 1)."""
    if set(spec.costs) != set(spec.models):
        raise ValueError(f"costs: keys {sorted(spec.costs)} must be exactly the models {sorted(spec.models)}")
    if any(c < 0 for c in spec.costs.values()):
        raise ValueError(f"costs: must be >= 0, got {spec.costs}")
    if len(spec.cost_norm) != len(spec.models):
        raise ValueError(f"cost_norm: {len(spec.cost_norm)} values for {len(spec.models)} models")
    c = np.array([spec.costs[m] for m in spec.models], dtype=np.float64)
    if c.max() == c.min():
        raise ValueError("costs: every model costs the same; there is nothing to route")
    expected = (c - c.min()) / (c.max() - c.min())
    if not np.allclose(spec.cost_norm, expected, rtol=0, atol=1e-6):
        raise ValueError(f"cost_norm: {spec.cost_norm} is not the costs scaled to [0, 1] ({expected.tolist()})")
    if spec.cost_norm[spec.models.index(spec.strong)] < 1 - 1e-6:
        raise ValueError(f"strong: '{spec.strong}' is not the costliest model (cost_norm {spec.cost_norm})")


def threshold_bound(cost_norm: list[float]) -> float:
    """|threshold| a calibrated router can have. Predicted qualities lie in [0, 1], so the routing score
    (quality difference per unit of normalized-cost difference) lies within 1 / (smallest cost gap);
    calibration adds "always strong" / "always cheapest" end points 1 beyond the scores (calibrate.py)."""
    c = np.unique(np.asarray(cost_norm, dtype=np.float64))
    return float(1.0 / np.diff(c).min() + 1.0)


def check_threshold(spec: RouterSpec) -> None:
    bound = threshold_bound(spec.cost_norm)
    if not abs(spec.threshold) <= bound * (1 + 1e-9):  # slack for float rounding of the end points
        raise ValueError(f"threshold: {spec.threshold:g} is outside the score's range [{-bound:g}, {bound:g}]")


# ------------------------------------------------------------------------------------------ tensors


def check_weights(spec: RouterSpec, weights: dict[str, np.ndarray]) -> None:
    """Every tensor the head needs, nothing else, with the shapes router.json and the features imply."""
    f = spec.features
    module = _router_module(spec.model)
    dims = {"dim": f.dim, "E": f.embedding_dim, "M": len(spec.models)}
    expected = {"feat.mean": ("dim",), "feat.scale": ("dim",),
                **{f"head.{k}": v for k, v in module.TENSORS.items()}}
    integer = {f"head.{k}" for k in getattr(module, "INTEGER_TENSORS", ())}
    if spec.shift is not None:
        expected["shift.keys"] = ("R", "E")
        if spec.shift.text_threshold is not None:
            dims["T"] = len(TEXT_FEATURES)
            expected.update({"shift.text_mean": ("T",), "shift.text_precision": ("T", "T")})
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"head '{spec.head}' needs tensors {sorted(expected)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    for name, shape in expected.items():
        _check_tensor(name, weights[name], shape, dims, name in integer)
        info = spec.tensors.get(name)
        if info is None or info.shape != list(weights[name].shape):
            raise ValueError(f"{name}: shape {list(weights[name].shape)} in {ROUTER_WEIGHTS} but router.json "
                             f"tensors.{name} says {None if info is None else info.shape}")
    if np.any(weights["feat.scale"] <= 0):
        raise ValueError("feat.scale: feature scales must be > 0 (features are divided by them)")
    if hasattr(module, "check"):  # what shapes cannot say (value ranges)
        module.check({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})
    if spec.shift is not None and weights["shift.keys"].shape[0] < spec.shift.k:
        raise ValueError(f"shift.keys: {weights['shift.keys'].shape[0]} reference prompts for shift.k = "
                         f"{spec.shift.k}")


def _check_tensor(name: str, arr: np.ndarray, shape: tuple, dims: dict, integral: bool = False) -> None:
    want = [dims.setdefault(s, arr.shape[i]) if isinstance(s, str) and i < arr.ndim else s
            for i, s in enumerate(shape)]
    if arr.ndim != len(shape) or list(arr.shape) != want or 0 in arr.shape:
        raise ValueError(f"{name}: shape {list(arr.shape)}, expected {want} "
                         f"({' x '.join(map(str, shape))} with dim={dims['dim']}, M={dims['M']})")
    if integral != np.issubdtype(arr.dtype, np.integer) or not (integral or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: dtype {arr.dtype}, expected {'an integer' if integral else 'a float'} type")
    if not integral and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: holds NaN or infinite values")


# ------------------------------------------------------------------------------------------ reading


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "required field is missing" if e["type"] == "missing" else \
            "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def check_router(raw: dict, weights: dict[str, np.ndarray], path: Path) -> RouterSpec:
    """Validate a router.json dict and its weights together (the writer calls it too, so what the route
    stage writes always loads)."""
    try:
        spec = RouterSpec.model_validate(raw)
    except ValidationError as err:
        raise OptkitError(f"{path}: {_one_line(err)}") from None
    try:
        check_weights(spec, weights)
    except ValueError as exc:
        raise OptkitError(f"{path.with_name(ROUTER_WEIGHTS)}: {exc}") from None
    return spec


class _NonFinite(str):
    """Stands in for NaN / Infinity while parsing (strict JSON has neither), so the error can name the field."""


def _find_non_finite(node, prefix: str = "") -> Optional[tuple[str, str]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, _NonFinite):
            return dotted, str(value)
        found = _find_non_finite(value, dotted)
        if found:
            return found
    return None


def read_json(path: Path) -> dict:
    """router.json as a dict; missing, non-UTF-8, malformed or non-object files are one-line errors."""
    if not path.is_file():
        raise OptkitError(f"{path}: not found (a router directory holds {ROUTER_JSON} and {ROUTER_WEIGHTS})")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_NonFinite)
    except UnicodeDecodeError as exc:
        raise OptkitError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise OptkitError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg.removesuffix(' at')}, "
                          f"column {exc.colno})") from None
    except RecursionError:
        raise OptkitError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise OptkitError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        where = _find_non_finite(raw)
    except RecursionError:
        raise OptkitError(f"{path}: invalid JSON (nested too deeply)") from None
    if where is not None:
        raise OptkitError(f"{path}: {where[0]}: {where[1]} is not valid JSON (numbers must be finite)")
    if type(raw.get("format_version")) is not int or raw["format_version"] != 1:  # not True, not 1.0
        raise OptkitError(f"{path}: format_version: {raw.get('format_version')!r} is not 1 (written by another "
                          "optkit version?)")
    return raw


def read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # numpy-only reader

    if not path.is_file():
        raise OptkitError(f"{path}: not found (the router's weights; re-run the route stage)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types (and OSError) on a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OptkitError(f"{path}: cannot read ({first})") from None


def read_router(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(router.json as a dict, the weights), validated against each other; static embedder files present."""
    raw = read_json(directory / ROUTER_JSON)
    weights = read_weights(directory / ROUTER_WEIGHTS)
    spec = check_router(raw, weights, directory / ROUTER_JSON)
    for name in spec.features.static_files:
        if not (directory / name).is_file():
            raise OptkitError(f"{directory / ROUTER_JSON}: features.static_files: {directory / name} is missing")
    return raw, weights
