"""The base of every recipe section, and the stage order."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

STAGE_ORDER = ("collect", "distill", "quantize", "route", "cache", "evaluate", "export")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
