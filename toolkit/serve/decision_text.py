"""The text the gateway decides on: the recipe's prompt column, read back out of a user turn its prompt template
rendered.

Route and cache are fit on the raw prompt column (data.prompt_column: the records' `prompt`), while clients send
what the models were asked: the template filled in (data.prompt_template). Deciding on the filled-in template
would embed the template's fixed instructions with every prompt (every message then looks alike to the cache),
so the gateway matches the user turn against the template and decides on the column's value, exactly the text
evaluate's replay decided on. A turn that does not match is decided on whole (counted on /metrics).

Template -> regular expression: literal text must match (a run of whitespace matches any run of whitespace), the
decision column is captured, every other field is captured too and goes into the cache namespace: two requests
whose other fields differ ("Translate to {lang}: {text}") were asked different things and never share an answer.
Imports re / string / hashlib only.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Optional


def compile_template(template: str, column: str) -> tuple[re.Pattern, str, list[str]]:
    """(pattern, the decision group's name, the other groups' names); ValueError says what cannot be read back."""
    parts, groups, decision, seen = [], [], None, {}
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.extend(r"\s+" if chunk.isspace() else re.escape(chunk) for chunk in re.split(r"(\s+)", literal)
                     if chunk)
        if field is None:
            continue
        if field == column:
            if spec or conversion:
                written = field + ("!" + conversion if conversion else "") + (":" + spec if spec else "")
                raise ValueError(f"the template writes {{{column}}} with a conversion or format spec "
                                 f"('{{{written}}}'); the gateway cannot read the column back out of such a message")
            if decision is not None:  # the same value again: must repeat exactly
                parts.append(f"(?P={decision})")
                continue
            decision = "d"
            parts.append(f"(?P<{decision}>.*?)")
        elif (field, spec, conversion) in seen:  # a field written twice holds the same value twice
            parts.append(f"(?P={seen[(field, spec, conversion)]})")
        else:
            name = seen[(field, spec, conversion)] = f"f{len(groups)}"
            groups.append(name)
            parts.append(f"(?P<{name}>.*?)")
    if decision is None:
        raise ValueError(f"the template never uses {{{column}}}: the decision text cannot be read from a message")
    return re.compile(r"\s*" + "".join(parts) + r"\s*", re.DOTALL), decision, groups


class DecisionText:
    """extract(user turn) -> (decision text, the other fields' values) when the turn is the template filled in,
    else None (the caller then decides on the whole turn)."""

    def __init__(self, template: str, column: str):
        self.pattern, self._decision, self._others = compile_template(template, column)
        self.id = hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]  # in the namespace: one per template

    def extract(self, text: str) -> Optional[tuple[str, list[str]]]:
        match = self.pattern.fullmatch(text)
        if match is None:
            return None
        value = match.group(self._decision)
        if not value.strip():
            return None  # an empty column value: nothing to decide on but the template itself
        return value, [match.group(g) for g in self._others]
