"""The recipe reference: a markdown row per field (README and `optkit schema`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from toolkit.config.loading import _first_model
from toolkit.config.recipe import Recipe


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:  # PositiveInt & co: the base type and its bounds
        base, *meta = get_args(tp)
        bounds = [f"{op} {getattr(m, attr)}" for m in meta
                  for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                  if getattr(m, attr, None) is not None]
        return _type_name(base) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def schema_reference(cls: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Markdown table rows `| key | type | default | description |` for every field, depth first."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        default = "required" if field.is_required() else (
            "{…}" if field.default_factory is not None else repr(field.default))
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")
        sub = _first_model(field.annotation)
        if sub is not None and get_origin(field.annotation) is not dict:
            rows.extend(schema_reference(sub, prefix=key + "."))
        elif get_origin(field.annotation) is dict and sub is not None:
            rows.extend(schema_reference(sub, prefix=key + ".<name>."))
    return rows
