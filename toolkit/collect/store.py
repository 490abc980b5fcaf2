"""The resumable result store: one fsync'd JSONL line per finished teacher answer.

Keyed by hash(model identity, messages, generation params), so a rerun sends only what is missing, and a
changed model or setting never reuses an old answer. A `kill -9` can at worst tear the last line; it is cut
off on open. Failures are not stored: a rerun tries those prompts again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def result_key(identity: dict, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": identity, "messages": messages, "params": params}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._results: dict[str, dict] = {}
        self._load()
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a killed writer: drop it before appending
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # cannot happen for fsync'd whole lines; never let one bad line block a resume
            self._results[row["key"]] = row["result"]

    def __contains__(self, key: str) -> bool:
        return key in self._results

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: str) -> dict | None:
        return self._results.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Append durably: when this returns, the answer survives a crash."""
        self._file.write(json.dumps({"key": key, "result": result}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._results[key] = result

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> Iterator[str]:
        return iter(self._results)


class InFlightLog:
    """Which requests were sent and not yet settled, so a run after a crash can say what it sends again.

    One line per event ("S <key>" when a request is first sent, "E <key>" when it is answered or given up),
    appended and flushed (a killed process loses nothing the kernel already has). Keys with an S and no E
    were in flight when the previous run died: the server may have answered them (and billed them), but
    their answers never reached the store, so they are sent again. At most `concurrency` of them.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous = self._unsettled()
        self._file = open(self.path, "w", encoding="utf-8")  # a fresh log for this run

    def _unsettled(self) -> set[str]:
        if not self.path.exists():
            return set()
        started, ended = set(), set()
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            kind, _, key = line.partition(" ")
            (started if kind == "S" else ended).add(key)
        return started - ended

    def _write(self, kind: str, key: str) -> None:
        self._file.write(f"{kind} {key}\n")
        self._file.flush()

    def started(self, key: str) -> None:
        self._write("S", key)

    def settled(self, key: str) -> None:
        self._write("E", key)

    def close(self) -> None:
        self._file.close()
