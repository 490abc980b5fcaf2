"""`cache.json`, validated: the loader trusts nothing in the file.

A threshold of -5 or NaN would serve unrelated answers to every query and `ttl_s: -1` would silently disable the
cache, so every field the runtime uses is checked for type, range, finiteness and length (strict pydantic: no
string-to-number coercion), and the first problem is one `OptkitError` line naming the file and the field.
Fields the runtime does not use (report numbers, definitions) are kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from toolkit.errors import OptkitError

FORMAT = "optkit-cache/1"
Finite = Annotated[float, Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class EmbedderSpec(_Model):
    model: str = Field(min_length=1)
    revision: Optional[str] = None
    dim: Optional[int] = Field(None, ge=1)  # written by the stage; when absent, the probe vectors' length
    probe_vectors: list[list[Finite]] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> "EmbedderSpec":
        from toolkit.cache.runtime import PROBES

        if len(self.probe_vectors) != len(PROBES):
            raise ValueError(f"probe_vectors has {len(self.probe_vectors)} rows, want {len(PROBES)}")
        dim = self.dim or len(self.probe_vectors[0])
        if any(len(v) != dim for v in self.probe_vectors):
            raise ValueError(f"probe_vectors rows must all have dim={dim} values")
        self.dim = dim
        return self


class SimilaritySpec(_Model):
    kind: Literal["cosine", "diagonal"]
    weights: Optional[list[Weight]] = Field(None, min_length=1)  # diagonal: w of sum_i w_i q_i c_i

    @model_validator(mode="after")
    def _weights(self) -> "SimilaritySpec":
        if self.kind == "diagonal" and (not self.weights or max(self.weights) <= 0):
            raise ValueError("kind diagonal needs weights (>= 0, not all zero)")
        if self.kind == "cosine" and self.weights is not None:
            raise ValueError("kind cosine takes no weights")
        return self

    @property
    def limit(self) -> float:
        """|score| never exceeds this for unit vectors: a threshold beyond it is meaningless."""
        return 1.0 if self.weights is None else float(max(self.weights))


def _check_range(value: Optional[float], info: ValidationInfo, what: str = "Input") -> None:
    sim = info.data.get("similarity")
    limit = sim.limit if sim is not None else 1.0
    if value is not None and value < -limit:
        raise ValueError(f"{what} should be greater than or equal to {-limit:g} (the similarity's range)")
    if value is not None and value > limit:
        raise ValueError(f"{what} should be less than or equal to {limit:g} (the similarity's range)")


class AdaptiveSpec(_Model):
    exported: bool
    thresholds: list[Optional[Finite]] = Field(min_length=1)
    centroids: list[list[Finite]] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> "AdaptiveSpec":
        if len(self.centroids) != len(self.thresholds):
            raise ValueError(f"{len(self.centroids)} centroids but {len(self.thresholds)} thresholds")
        if len({len(c) for c in self.centroids}) != 1:
            raise ValueError("centroids differ in length")
        return self


class ReferenceSpec(_Model):
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file beside cache.json, never a path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n: int = Field(ge=1)


class QueryThresholdSpec(_Model):
    """cache.adaptive: query (toolkit/cache/local.py): the threshold of query q and its nearest entry c is
    offset - slopes . [features(q), entry_features(c)]."""
    offset: Finite
    slopes: list[Finite]
    support: Finite  # crowding_5 below it = an unfamiliar query
    fallback: Optional[Finite]  # its threshold is at least this (None: no semantic hit)
    features: list[str]
    reference: ReferenceSpec

    @field_validator("features")
    @classmethod
    def _features(cls, value):
        from toolkit.cache.local import FEATURES, QUERY_FEATURES

        # QUERY_FEATURES alone: cache.query_entry off, as every cache.json written before it
        if value not in (list(FEATURES), list(QUERY_FEATURES)):
            raise ValueError(f"{value} are not this version's {list(FEATURES)} (or its first {len(QUERY_FEATURES)})")
        return value

    @model_validator(mode="after")
    def _slopes(self):
        if len(self.slopes) != len(self.features):
            raise ValueError(f"slopes: {len(self.slopes)} values, want one per feature ({len(self.features)})")
        return self


class RuntimeSpec(_Model):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    ttl_s: Optional[Annotated[float, Field(gt=0)]] = None
    max_entries: int = Field(100_000, ge=1)
    max_entries_per_namespace: Optional[Annotated[int, Field(ge=1)]] = None
    quota_by: Optional[Annotated[str, Field(min_length=1)]] = None  # the gateway counts the quota per tenant
    ann: Literal["auto", "numpy", "faiss"] = "auto"
    ann_min_entries: int = Field(20_000, ge=1)


class CacheFile(_Model):
    format: Literal["optkit-cache/1"]
    similarity: SimilaritySpec
    threshold: Optional[Finite]  # None = exact matches only (no threshold met the bound)
    embedder: EmbedderSpec
    adaptive: Optional[AdaptiveSpec] = None
    query_threshold: Optional[QueryThresholdSpec] = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value, info: ValidationInfo):
        _check_range(value, info)
        return value

    @field_validator("adaptive")
    @classmethod
    def _cluster_thresholds(cls, value, info: ValidationInfo):
        for i, t in enumerate(value.thresholds if value is not None else []):
            _check_range(t, info, f"thresholds.{i}")
        return value

    @model_validator(mode="after")
    def _dims(self) -> "CacheFile":
        qt = self.query_threshold
        if qt is not None and qt.fallback != self.threshold:  # the guard falls back to the global threshold
            raise ValueError(f"query_threshold.fallback {qt.fallback} is not the threshold {self.threshold}")
        if self.query_threshold is not None and self.adaptive is not None and self.adaptive.exported:
            raise ValueError("query_threshold and exported adaptive clusters exclude each other (the stage writes "
                             "one)")
        if self.adaptive is not None and len(self.adaptive.centroids[0]) != self.embedder.dim:
            raise ValueError(f"adaptive centroids have {len(self.adaptive.centroids[0])} values, the embedder "
                             f"dim is {self.embedder.dim}")
        if self.similarity.weights is not None and len(self.similarity.weights) != self.embedder.dim:
            raise ValueError(f"similarity weights have {len(self.similarity.weights)} values, the embedder dim is "
                             f"{self.embedder.dim}")
        return self


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in strict JSON")


def one_line(exc: ValidationError, source: str) -> OptkitError:
    """The first validation error as one line naming the field (and the value, cut short)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] == "missing" else f" (got {repr(err.get('input'))[:60]})"
    return OptkitError(f"{source}: field '{where}': {msg}{got}")


def read(path: Path) -> CacheFile:
    """The validated cache.json at `path`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OptkitError(f"cache config not found: {path}") from None
    except OSError as exc:
        raise OptkitError(f"{path}: cannot read the cache config ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise OptkitError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise OptkitError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise OptkitError(f"{path}: not an optkit cache config (a JSON object is expected)")
    if data.get("format") != FORMAT:
        raise OptkitError(f"{path}: not an optkit cache config (format {str(data.get('format'))[:40]!r}, "
                          f"want {FORMAT})")
    return validate(data, str(path))


def validate(data: Any, source: str) -> CacheFile:
    try:
        return CacheFile.model_validate(data)
    except ValidationError as exc:
        raise one_line(exc, source) from None


def runtime_settings(spec: CacheFile, overrides: dict, source: str) -> RuntimeSpec:
    """The file's runtime settings with the caller's overrides, validated together."""
    merged = {**spec.runtime.model_dump(), **overrides}
    try:
        return RuntimeSpec.model_validate(merged)
    except ValidationError as exc:
        raise one_line(exc, f"{source} (runtime settings)") from None
