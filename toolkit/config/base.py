"""The base of every recipe section, and the stage order."""

from __future__ import annotations

from toolkit.settings import Section

STAGE_ORDER = ("collect", "distill", "quantize", "route", "cache", "evaluate", "export")

__all__ = ["STAGE_ORDER", "Section"]
