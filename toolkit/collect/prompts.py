"""Prompts from the recipe's data: read, template, dedupe, id, sample, split.

Every function here is pure (no model, no network), so the data half of collect fails fast on bad input
with an error that names the recipe field, file or line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from toolkit.config import DataConfig
from toolkit.errors import OptkitError
from toolkit.io import read_table


@dataclass
class Prompt:
    id: str
    split: str
    messages: list[dict]  # [{"role": "system"|"user", "content": str}]
    prompt: str  # the raw user text (data.prompt_column), what routers and caches see
    reference: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unit_hash(*parts: Any) -> float:
    """A stable number in [0, 1) from the parts (same on every machine and Python version)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(prompt_id: str, seed: int, train: float, val: float) -> str:
    # Each id's split depends only on (seed, id): adding rows to the data never moves existing prompts.
    u = unit_hash(seed, "split", prompt_id)
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


_CONVERSIONS = (None, "s", "r", "a")


def template_problem(template: str) -> Optional[str]:
    """What is wrong with a prompt template, checked without data (so `optkit validate` catches it too), or None.

    Row values reach the template as strings, so a format spec is checked against a string: '{text:>>}' and
    '{text:.2f}' fail here instead of on the first row at run time."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"invalid format string ({exc}); write literal braces as {{{{ }}}}"
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            return "use named fields like {text}, not positional {} or {0}"
        if conversion not in _CONVERSIONS:
            return f"unknown conversion '!{conversion}' in {{{field}}} (use !s, !r or !a)"
        if spec and "{" not in spec:  # a nested spec ('{text:{width}}') is only known per row
            try:
                format("", spec)
            except ValueError as exc:
                return f"bad format spec ':{spec}' in {{{field}}} ({exc})"
    return None


def template_fields(template: str) -> list[str]:
    """Column names a format string refers to (`{text}`, `{row[x]}` -> text, row)."""
    problem = template_problem(template)
    if problem:
        raise OptkitError(f"data.prompt_template: {problem}")
    return [field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template)
            if field is not None]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def render_user(row: dict, data: DataConfig, where: str = "a row") -> str:
    if data.prompt_template is None:
        return _text(row[data.prompt_column])
    try:
        return data.prompt_template.format_map({k: _text(v) for k, v in row.items()})
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
        # what only a row can reveal: a missing column, '{text[5]}' on a short value, a nested spec
        raise OptkitError(f"{where}: data.prompt_template {data.prompt_template!r} cannot be filled "
                          f"({type(exc).__name__}: {exc})") from None


def build_messages(user: str, system_prompt: Optional[str]) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}]


def messages_id(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_columns(rows: list[dict], data: DataConfig, source: str) -> None:
    have = set(rows[0])
    wanted = [("data.reference_column", data.reference_column), ("data.id_column", data.id_column)]
    if data.prompt_template:
        # With a template the prompt column is optional: without it, `prompt` is the templated message.
        wanted += [("data.prompt_template", name) for name in template_fields(data.prompt_template)]
    else:
        wanted.insert(0, ("data.prompt_column", data.prompt_column))
    for field, column in wanted:
        if column is not None and column not in have:
            raise OptkitError(f"{source}: column '{column}' ({field}) does not exist; columns are: "
                              f"{', '.join(sorted(have))}")


def read_data(path, fmt: str = "auto", split_name: Optional[str] = None, field: str = "data.path") -> list[dict]:
    """read_table, with the reader's own exceptions turned into one line naming the file (and line); `field`
    is the recipe key that named the file."""
    path = Path(path)
    if path.is_dir() and fmt in ("auto", "datasets"):
        if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise OptkitError(f"{path}: {field} is a directory but not one saved by datasets.save_to_disk (no "
                              "state.json or dataset_dict.json); give a .jsonl, .csv or .parquet file")
    elif path.is_dir() or (path.exists() and fmt == "datasets"):
        raise OptkitError(f"{path}: data.format is '{fmt}' but {field} is a "
                          f"{'directory' if path.is_dir() else 'file'}")
    try:
        return read_table(path, fmt, split_name)
    except UnicodeDecodeError:
        raise OptkitError(_not_utf8(path, field)) from None
    except csv.Error as exc:
        raise OptkitError(f"{path}: invalid CSV ({exc})") from None
    except (OSError, ValueError) as exc:  # unreadable file; a damaged datasets directory (pyarrow, json)
        raise OptkitError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _not_utf8(path: Path, field: str) -> str:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (f"{path}:{lineno}: not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
                        f"re-save {field} as UTF-8")
    return f"{path}: not UTF-8 text; re-save {field} as UTF-8"


def _row_columns(data: DataConfig) -> list[tuple[str, str]]:
    """(recipe field, column) pairs every row must have (the first row is checked by check_columns)."""
    wanted = [("data.id_column", data.id_column), ("data.reference_column", data.reference_column)]
    if data.prompt_template:
        wanted += [("data.prompt_template", name) for name in template_fields(data.prompt_template)]
    return [(field, column) for field, column in wanted if column is not None]


def data_file(recipe) -> Path:
    """The recipe's prompts file (data.path against the recipe's folder); refused when it is not there."""
    path = recipe.resolve_path(recipe.data.path)
    if not path.exists():
        raise OptkitError(f"data.path: file not found: {path}")
    return path


def load_prompts(data: DataConfig, path, seed: int) -> list[Prompt]:
    """All prompts of the data file, deduped, sampled to data.limit, each with its split. File order kept."""
    rows = read_data(path, data.format, data.split_name)
    if not rows:
        raise OptkitError(f"{path}: the dataset is empty (data.path has no rows)")
    check_columns(rows, data, str(path))
    required = _row_columns(data)
    prompts, seen_messages, seen_ids = [], set(), {}
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        for field, column in required:  # a later row can lack a column the first one has
            if column not in row:
                raise OptkitError(f"{where}: no column '{column}' ({field}); the first row has it")
        if row.get(data.prompt_column) in (None, "") and data.prompt_template is None:
            raise OptkitError(f"{where}: empty prompt in column '{data.prompt_column}' (data.prompt_column)")
        messages = build_messages(render_user(row, data, where), data.system_prompt)
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if data.dedupe and key in seen_messages:
            continue
        seen_messages.add(key)
        pid = _text(row[data.id_column]) if data.id_column else messages_id(messages)
        if not pid:
            raise OptkitError(f"{where}: empty id in column '{data.id_column}' (data.id_column)")
        if pid in seen_ids:
            raise OptkitError(f"{where}: id '{pid}' repeats row {seen_ids[pid] + 1}"
                              + (" (data.id_column must be unique)" if data.id_column else
                                 " (identical prompt; set data.dedupe: true or add data.id_column)"))
        seen_ids[pid] = i
        reference = _text(row[data.reference_column]) if data.reference_column else None
        prompt_text = _text(row[data.prompt_column]) if data.prompt_column in row else messages[-1]["content"]
        split = split_of(pid, seed, data.splits.train, data.splits.val)
        prompts.append(Prompt(pid, split, messages, prompt_text, reference))
    if data.limit is not None and len(prompts) > data.limit:
        # A hash sample, not the head of the file: data files are often sorted by label.
        keep = set(sorted(range(len(prompts)), key=lambda j: unit_hash(seed, "sample", prompts[j].id))[:data.limit])
        prompts = [p for j, p in enumerate(prompts) if j in keep]
    return prompts


def render_plain(messages: list[dict]) -> str:
    """Messages as plain text, for models used without a chat template (and the /completions API)."""
    return "\n\n".join(m["content"] for m in messages)
