"""Small file helpers shared by every stage: atomic writes, hashing, and reading tabular files with
errors that name the file and line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from toolkit.errors import OptkitError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(name: str) -> bool:
    """A name made by the writers below for a not-yet-published file or directory (`.x.tmp-*`, `.x.old-*`)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full or interrupted: leave the old file, not a half-written twin
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON: an undefined figure (NaN, infinity) is written as null, never a token other parsers reject."""
    atomic_write_text(path, json.dumps(finite_or_null(obj), indent=2, sort_keys=False, allow_nan=False,
                                       default=str) + "\n")


def finite_or_null(obj: Any) -> Any:
    """obj with every non-finite float (NaN, +-inf, numpy's too) replaced by None, recursively; numpy scalars and
    arrays as plain numbers and lists (not their str())."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        obj = obj.tolist()  # a scalar becomes a Python number or bool, an array nested lists
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def publish_modes(root: Path, executables: Iterable[str] = ()) -> None:
    """Make a tree readable by anyone who can reach it: dirs 0755, files 0644, `executables` (relative) 0755.

    A shipped bundle is read by another user (the serving process); the modes of the sources (0600 weights
    from a training job, 0700 from mkdtemp) and the umask must not leak into it.
    """
    root = Path(root)
    run = {Path(root, rel) for rel in executables}
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):  # never chmod what a link points to
                os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            path = Path(dirpath, f)
            if not path.is_symlink():
                os.chmod(path, 0o755 if path in run else 0o644)


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree as hard links where the filesystem allows (else real copies).

    For publishing a stage's own work files (hundreds of MB of weights) into its outputs without holding them
    twice on disk. Safe because nothing here rewrites a file in place: every writer replaces whole files
    (atomic_dir, save_pretrained), which leaves the other link's content untouched.
    """

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or links not supported
            shutil.copy2(a, b)

    shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=link_or_copy)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    lines = []
    for row in rows:
        lines.append(json.dumps(finite_or_null(row), ensure_ascii=False, allow_nan=False, default=str))
        n += 1
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return n


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def without_surrogates(text: str) -> str:
    """A lone UTF-16 surrogate (half an emoji, from a JSON "\\ud83d" escape) as U+FFFD: it cannot be written as
    UTF-8, so one in a prompt or a reply stopped every run at the same record."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def strings_without_surrogates(obj: Any) -> Any:
    """Every string of parsed JSON through without_surrogates."""
    if isinstance(obj, str):
        return without_surrogates(obj)
    if isinstance(obj, dict):
        return {strings_without_surrogates(k): strings_without_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strings_without_surrogates(v) for v in obj]
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """Every line a JSON object; a bad line is an error naming file and line number. Lone surrogates (only a
    JSON escape can make one) become U+FFFD."""
    rows = []
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not data
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if _SURROGATE_ESCAPE.search(line):
                    obj = strings_without_surrogates(obj)
            except json.JSONDecodeError as exc:
                # json's own messages may end in "at" ("Unterminated string starting at"): no "at at column"
                msg = exc.msg.removesuffix(" at")
                raise OptkitError(f"{path}:{lineno}: invalid JSON ({msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise OptkitError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return rows


def read_table(path: Path, fmt: str = "auto", split_name: str | None = None) -> list[dict]:
    """Rows of a .jsonl / .csv / .parquet file or a datasets directory, as dicts."""
    path = Path(path)
    if not path.exists():
        raise OptkitError(f"data file not found: {path}")
    if fmt == "auto":
        if path.is_dir():
            fmt = "datasets"
        else:
            suffix = path.suffix.lower()
            fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix, "")
            if not fmt:
                raise OptkitError(f"{path}: cannot tell the format from '{suffix}'; set data.format")
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "csv":
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise OptkitError(f"{path}: empty CSV file (no header line)")
            rows = []
            for lineno, row in enumerate(reader, 2):
                if None in row:
                    raise OptkitError(f"{path}:{lineno}: more fields than the header has")
                rows.append(row)
            return rows
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise OptkitError(f"{path}: cannot read parquet ({exc})") from None
    if fmt == "datasets":
        try:
            import datasets
        except ImportError:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("reading a datasets directory", "datasets", "datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split_name is None:
                raise OptkitError(f"{path}: a DatasetDict with splits {list(ds)}; set data.split_name")
            if split_name not in ds:
                raise OptkitError(f"{path}: no split '{split_name}' (has {list(ds)})")
            ds = ds[split_name]
        return ds.to_list()
    raise OptkitError(f"{path}: unknown format '{fmt}'")


def require_columns(rows: list[dict], columns: Iterable[str | None], source: str, field_prefix: str = "") -> None:
    if not rows:
        raise OptkitError(f"{source}: no rows")
    have = set(rows[0])
    for col in columns:
        if col is not None and col not in have:
            raise OptkitError(f"{source}: column '{col}' does not exist{(' (' + field_prefix + ')') if field_prefix else ''};"
                              f" columns are: {', '.join(sorted(have))}")
