"""Optional MLflow model registry entry for a bundle: the bundle directory is logged as artifacts of the export
stage's run and registered as a new version of one registered model. No pickled Python model is involved: the
version points at the bundle files (safetensors, JSON, GGUF) as they are."""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import OptkitError


def register(ctx, bundle: Path, name: str, manifest_sha256: str) -> dict:
    tracker = ctx.tracker
    client = getattr(tracker, "client", None)
    if client is None or tracker.run_id is None:
        raise OptkitError("export.register_model needs MLflow tracking (tracking.enabled: true)")
    from mlflow.exceptions import MlflowException

    tracker.log_artifact(bundle, "bundle")
    run = client.get_run(tracker.run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/bundle"
    try:
        client.create_registered_model(name, description="optkit bundle: models, router, cache config")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = client.create_model_version(name, source, run_id=tracker.run_id,
                                          tags={"optkit.manifest_sha256": manifest_sha256,
                                                "optkit.run": ctx.recipe.name})
    return {"name": name, "version": int(version.version), "source": source}
