"""Process-level defaults that matter on CPU, and secret redaction for logs.

`configure()` must run before torch is imported: OpenMP reads OMP_WAIT_POLICY once, at start-up.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("optkit")

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret so log records never show it (API keys read from the environment or the recipe)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """Registered secrets masked, and credentials inside URLs (user:password@, ?api_key=) too."""
    from toolkit.redact import redact_text

    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "***")
    return redact_text(text)


class RedactSecrets(logging.Filter):
    """On a handler: every record it prints, from any logger, has secrets and URL credentials masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def physical_cores() -> int:
    """Physical cores (hyper-threads share FPUs; torch matmuls gain nothing from them)."""
    try:
        with open("/proc/cpuinfo") as f:
            pairs = set()
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
            if pairs:
                return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def configure(threads: int | None = None, offline: bool = True) -> None:
    # Measured here: with the default ACTIVE policy, idle OpenMP threads spin and steal the shared cores,
    # making decode ~7x slower under load. PASSIVE lets them sleep.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Rust tokenizers fork-parallelism deadlocks under DataLoader workers / multiprocessing.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    n = threads or physical_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import sys

    if "torch" in sys.modules:  # already imported (tests, notebooks): set what can still be set
        sys.modules["torch"].set_num_threads(n)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("optkit")
    if any(isinstance(f, RedactSecrets) for f in root.filters):
        return
    root.setLevel(level)
    root.addFilter(RedactSecrets())
    # Libraries' records (httpx logs every request URL) reach the root logger's handlers: mask them there too.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    if not root.handlers:
        try:
            from rich.logging import RichHandler

            handler: logging.Handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        except ImportError:  # pragma: no cover
            handler = logging.StreamHandler()
        handler.addFilter(RedactSecrets())
        root.addHandler(handler)
    root.propagate = False
