"""Start the gateway: load serve.yaml and the bundle's decision parts, then run the app under uvicorn.

One uvicorn worker per gateway process: the cache lives in the process (replicas would each hold their own).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from toolkit.errors import MissingExtraError

log = logging.getLogger("optkit.serve")


def _logging() -> None:
    """Every handler masks registered secrets and URL credentials (the teacher's key is registered on load)."""
    from toolkit.runtime import RedactSecrets, setup_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call would drown the access log
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())


def build(bundle: str | Path, config: Optional[str | Path] = None):
    """(FastAPI app, ServeConfig) for a bundle."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("optkit serve", exc.name or "fastapi", "serve") from None
    from toolkit.serve.app import create_app
    from toolkit.serve.audit import bundle_targets
    from toolkit.serve.system import load_config, load_decider

    cfg = load_config(Path(bundle), Path(config) if config else None)
    return create_app(cfg, load_decider(Path(bundle), cfg), bundle_targets(Path(bundle))), cfg


def serve(bundle: str | Path, config: Optional[str | Path] = None, host: str = "127.0.0.1", port: int = 8080) -> int:
    _logging()
    app, cfg = build(bundle, config)
    import uvicorn

    log.info("serve: %s as model '%s' on http://%s:%d/v1 (backends: %s)", bundle, cfg.model_name, host, port,
             ", ".join(cfg.backends))
    uvicorn.run(app, host=host, port=port, log_config=None, workers=1)
    return 0
