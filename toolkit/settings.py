"""The base of every settings model (recipe sections, engine and method settings).

It lives outside toolkit.config so that a module the config package imports (an engine, a quantization
method) can define its own settings class without importing toolkit.config itself (an import cycle).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
