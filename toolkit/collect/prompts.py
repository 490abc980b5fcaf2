"""Prompts from the recipe's data: read, template, dedupe, id, sample, split.

Every function here is pure (no model, no network), so the data half of collect fails fast on bad input
with an error that names the recipe field, file or line.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
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


def template_fields(template: str) -> list[str]:
    """Column names a format string refers to (`{text}`, `{row[x]}` -> text, row)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OptkitError(f"data.prompt_template: invalid format string ({exc}); write literal braces as {{{{ }}}}") \
            from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise OptkitError("data.prompt_template: use named fields like {text}, not positional {} or {0}")
        names.append(name)
    return names


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def render_user(row: dict, data: DataConfig) -> str:
    if data.prompt_template is None:
        return _text(row[data.prompt_column])
    return data.prompt_template.format_map({k: _text(v) for k, v in row.items()})


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


def load_prompts(data: DataConfig, path, seed: int) -> list[Prompt]:
    """All prompts of the data file, deduped, sampled to data.limit, each with its split. File order kept."""
    rows = read_table(path, data.format, data.split_name)
    if not rows:
        raise OptkitError(f"{path}: the dataset is empty (data.path has no rows)")
    check_columns(rows, data, str(path))
    prompts, seen_messages, seen_ids = [], set(), {}
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        if row.get(data.prompt_column) in (None, "") and data.prompt_template is None:
            raise OptkitError(f"{where}: empty prompt in column '{data.prompt_column}' (data.prompt_column)")
        messages = build_messages(render_user(row, data), data.system_prompt)
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if data.dedupe and key in seen_messages:
            continue
        seen_messages.add(key)
        pid = _text(row[data.id_column]) if data.id_column else messages_id(messages)
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
