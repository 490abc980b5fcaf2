"""Reading a recipe: YAML, `key.path=value` overrides, validation errors as one line per problem."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Sequence, get_args

from pydantic import BaseModel, ValidationError

from toolkit.config.recipe import Recipe
from toolkit.errors import OptkitError


def _model_at(cls: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class found by walking `loc` (field names) down from `cls`."""
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            # dict keys and union tags: keep the current model only if the key names a field-less container
            continue
        cls = _first_model(field.annotation)
    return cls


def _first_model(tp: Any) -> Optional[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel] = None,
                            overrides: Sequence[str] = ()) -> str:
    """One readable line per problem: `file: key.path: message (did you mean 'x'?)` -- or `override 'k=v'` in
    place of the file when the value came from the command line."""
    root = root or Recipe
    given = {".".join(parse_override(o)[0]): o for o in overrides}
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        origin = next((f"override '{o[:80]}'" for k, o in given.items()  # at, below or (a model check) above it
                       if path == k or path.startswith(k + ".") or (loc and k.startswith(path + "."))), source)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            options = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), options, n=1, cutoff=0.6)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                   (f"; allowed: {', '.join(options)}" if options else ""))
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines += [f"{origin}: {path}: {part}" for part in msg.splitlines() or [msg]]
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], yaml-parsed value)."""
    import yaml

    if "=" not in text:
        raise OptkitError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise OptkitError(f"override '{text}': empty key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise OptkitError(f"override '{text}': value is not valid YAML ({exc})") from None
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # `data.system_prompt=Note: be brief` is text; a mapping is written {k: v}
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise OptkitError(f"override '{text}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def read_utf8(path: Path) -> str:
    """A text file's content; bytes that are not UTF-8 are an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise OptkitError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None


def _strict_loader():
    """yaml.SafeLoader refusing a key repeated in one mapping: PyYAML keeps the last silently, so a second `data:`
    section would replace the first whole and the run would use settings nobody wrote."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges are YAML's own way to set keys again
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key '{key}' (the earlier one would be ignored)",
                            key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data; a missing file, non-UTF-8 bytes, bad YAML or a key repeated in one mapping is one
    OptkitError naming file:line:column."""
    import yaml

    if not path.is_file():
        raise OptkitError(f"{what} file not found: {path}")
    try:
        return yaml.load(read_utf8(path), Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise OptkitError(f"{where}: invalid YAML: {problem}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file. Every problem is an OptkitError naming file, line or key."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    if data is None:
        raise OptkitError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise OptkitError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    recipe = recipe_from_dict(data, source=str(path), overrides=list(overrides))
    recipe._base_dir = path.resolve().parent
    return recipe


def recipe_from_dict(data: dict, source: str = "recipe", overrides: Sequence[str] = ()) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise OptkitError(format_validation_error(err, source, overrides=overrides)) from None
