"""The gateway side of a bundle: serve.yaml for a bundle with a router but no model of its own (a route-only
recipe), and serve.sh's `gateway` command, which points serve.yaml's backends at servers named in the environment.

A route-only bundle's router picks among models that run elsewhere (APIs, a vLLM or llama.cpp server): serve.yaml
gets one backend per router model (routes: router model -> backend of the same name), each at a placeholder URL
http://127.0.0.1:<export.port + i>/v1 asking for the router's model name; the weak models fall back to the strong
one; misses go to the strong model. `./serve.sh gateway` then starts `optkit serve .` with serve.yaml, after
replacing each backend's placeholder URL / model by $OPTKIT_<BACKEND>_URL / $OPTKIT_<BACKEND>_MODEL when set (for a
two-model router also $OPTKIT_STRONG_URL / $OPTKIT_WEAK_URL). Only the exact placeholder lines are replaced, so a
serve.yaml edited by hand keeps the edits.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional


def router_models(route_dir: Path) -> tuple[list[str], str]:
    """(router model names, strong model) from a bundle's route/, validated as the gateway will load it."""
    from toolkit.route.spec import read_router

    spec, _ = read_router(route_dir)
    return list(spec["models"]), spec["strong"]


def env_name(backend: str, what: str) -> str:
    return "OPTKIT_" + re.sub(r"[^A-Za-z0-9]", "_", backend).upper() + "_" + what


def _line(text: str, backend: str, key: str) -> Optional[str]:
    """The exact serve.yaml line holding backends.<backend>.<key> (block style, as yaml.safe_dump writes it)."""
    lines = text.splitlines()
    try:
        start = lines.index("backends:")
    except ValueError:
        return None
    inside = False
    for ln in lines[start + 1:]:
        if not ln.startswith("  "):
            return None  # past the backends block
        if not ln.startswith("    "):
            inside = ln.strip().rstrip(":").strip("'\"") == backend
        elif inside and ln.startswith(f"    {key}: "):
            return ln
    return None


SAFE = re.compile(r"^[^$`\"\\}']*$")  # a value that can sit in "${VAR:-value}" and a quoted case pattern


def gateway_case(serve_yaml_text: str, strong: Optional[str] = None, weak: Optional[str] = None) -> str:
    """serve.sh's `gateway)` case: serve.yaml with env overrides of each backend's URL and model (whole lines
    matched exactly), then `exec optkit serve`. strong / weak: the backends OPTKIT_STRONG_URL / OPTKIT_WEAK_URL
    also point at."""
    import yaml

    alias = {strong: "OPTKIT_STRONG_URL", weak: "OPTKIT_WEAK_URL"}
    lines = serve_yaml_text.splitlines()
    cases = []
    for name in yaml.safe_load(serve_yaml_text)["backends"]:
        for key, what in (("base_url", "URL"), ("model", "MODEL")):
            line = _line(serve_yaml_text, name, key)
            if line is None or lines.count(line) != 1 or not SAFE.match(line):
                continue  # not a line we can replace unambiguously: serve.yaml alone decides
            value = line.split(": ", 1)[1]
            if key == "base_url" and name in alias:
                value = f"${{{alias[name]}:-{value}}}"
            cases.append(f'        {shlex.quote(line)}) line="    {key}: ${{{env_name(name, what)}:-{value}}}" ;;')
    body = "\n".join(cases)
    return f"""  gateway)
    # cache -> router -> backends; each backend's URL / model from $OPTKIT_<BACKEND>_URL / _MODEL when set
    config="$(mktemp "${{TMPDIR:-/tmp}}/optkit-serve.XXXXXX")"
    while IFS= read -r line || [ -n "$line" ]; do
      case "$line" in
{body}
      esac
      printf '%s\\n' "$line"
    done < serve.yaml > "$config"
    echo "gateway: backends as in $config:" >&2
    grep -E '^    (base_url|model): ' "$config" >&2 || true
    exec optkit serve . --config "$config" "${{@:2}}"
    ;;"""
