"""MLflow tracking: one run per recipe run, one nested run per stage (and per variant where a stage wants).

Default store: a sqlite file under the artifacts dir, so a laptop run needs no server; set
MLFLOW_TRACKING_URI (or tracking.uri) to log to a team server instead. Params are logged in batches,
and never contain secrets (the recipe is flattened from `Recipe.public_dict()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from toolkit.errors import OptkitError
from toolkit.redact import redact_url
from toolkit.runtime import redact

log = logging.getLogger("optkit.tracking")

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (characters)
BATCH = 100  # MLflow's log_batch limit on params per call


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            text = redact(str(value))
            out[name] = text[:MAX_PARAM_LEN]
    return out


def default_uri(artifacts_dir: Path) -> str:
    return f"sqlite:///{(Path(artifacts_dir) / 'mlflow.db').resolve()}"


class Tracker:
    """Thin wrapper over the MLflow client; the pipeline owns the run ids, stages just log."""

    def __init__(self, uri: str, experiment: str, artifacts_dir: Path):
        import mlflow  # noqa: F401  (configures its loggers on import; quieted below)
        from mlflow.tracking import MlflowClient

        # mlflow installs its own handlers on import and logs every sqlite migration at INFO: noise in a CLI
        # run. Quiet it after the import, or the import resets the level.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        # Only an explicit client, never mlflow.set_tracking_uri(): that also exports MLFLOW_TRACKING_URI into
        # os.environ, which (winning over tracking.uri by design) would capture every later run in the process.
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):  # keep artifacts beside the db, not in the working dir
                location = (Path(artifacts_dir) / "mlruns").resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self._stack: list[str] = []

    @property
    def run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def run(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """Start a run (nested under the current one, if any); ends it FINISHED or FAILED."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if self._stack:
            all_tags[MLFLOW_PARENT_RUN_ID] = self._stack[-1]
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        self._stack.append(run_id)
        status = "FINISHED"
        try:
            yield run_id
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._stack.pop()
            self.client.set_terminated(run_id, status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class NullTracker(Tracker):
    """Tracking switched off: same interface, does nothing."""

    def __init__(self):  # noqa: D107 - nothing to connect to
        self._stack = []
        self.uri = None

    @contextlib.contextmanager
    def run(self, name, tags=None):
        self._stack.append(name)
        try:
            yield name
        finally:
            self._stack.pop()

    def log_params(self, params): ...
    def log_metrics(self, metrics, step=None): ...
    def set_tags(self, tags): ...
    def log_artifact(self, path, artifact_path=None): ...


def make_tracker(enabled: bool, uri: str | None, experiment: str, artifacts_dir: Path) -> Tracker:
    """The MLflow tracker; a store that cannot be used is an OptkitError within seconds, not a traceback."""
    if not enabled:
        return NullTracker()
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or default_uri(artifacts_dir)
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    _probe_server(uri, source)
    try:
        return Tracker(uri, experiment, artifacts_dir)
    except Exception as exc:  # mlflow raises many types for a bad scheme, path or server
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise OptkitError(f"{source}: cannot use the MLflow tracking store {redact_url(uri)} ({redact(first)}); "
                          "fix it, or set tracking.enabled: false") from None


def _probe_server(uri: str, source: str, timeout_s: float = 5.0) -> None:
    """An http(s) store that does not answer fails here in seconds (MLflow itself retries for minutes)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise OptkitError(f"{source}: MLflow tracking server {redact_url(uri)} is not reachable "
                          f"({exc.strerror or exc if isinstance(exc, OSError) else exc}); start it, fix the URI, "
                          "or set tracking.enabled: false") from None
