"""The one loop over stages.

A run directory holds the resolved recipe (written first) and one directory per stage. Each stage writes
`manifest.json`: status, config hash, upstream fingerprints, input files with sha256, outputs with sha256,
metrics and timings. A stage is done only when its manifest says `done`; a done stage whose config, inputs,
upstream outputs and own outputs (content, see stagedir.changed_output) are unchanged is skipped on re-run, and
no stage starts on upstream outputs that differ from what their manifest recorded. A stage that was interrupted
resumes from whatever it keeps under `<stage>/work/` (content-addressed results, checkpoints); that folder is not
an output.

A stage is a package with `run(ctx: StageContext) -> dict | None` (the dict = headline metrics) and `READS`: the
top-level recipe keys besides its own section that its outputs depend on. A key naming another stage means it
consumes that stage's outputs (when the recipe has it); any other key (teacher, data, seed, ...) goes into its
config hash. The declaration sits next to the code that reads the recipe, so it cannot drift from a table here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from toolkit import __version__
from toolkit.config import STAGE_ORDER, Recipe, config_hash
from toolkit.errors import OptkitError
from toolkit.io import atomic_write_text, sha256_file
from toolkit.runtime import redact
from toolkit.stagedir import (MANIFEST, WORK, changed_output, disk_full, fingerprint, hash_outputs,  # noqa: F401
                              is_done, read_manifest, recover, write_manifest)
from toolkit.tracking import NullTracker, Tracker, flatten  # noqa: F401

log = logging.getLogger("optkit.pipeline")

# stage name -> package with run(ctx) and READS. Adding a stage is one line here and one package.
STAGES: dict[str, str] = {
    "collect": "toolkit.collect",
    "distill": "toolkit.distill",
    "quantize": "toolkit.quantize",
    "route": "toolkit.route",
    "cache": "toolkit.cache",
    "evaluate": "toolkit.evaluate",
    "export": "toolkit.export",
}

assert set(STAGES) == set(STAGE_ORDER)


def stage_module(stage: str):
    return importlib.import_module(STAGES[stage])


def stage_reads(stage: str) -> tuple[str, ...]:
    """The recipe keys a stage declares it reads (its package's READS), checked against the schema."""
    reads = getattr(stage_module(stage), "READS", None)
    if reads is None:
        raise TypeError(f"{STAGES[stage]} declares no READS (the recipe keys its outputs depend on)")
    unknown = [k for k in reads if k not in Recipe.model_fields or k == stage]
    later = [k for k in reads if k in STAGE_ORDER and STAGE_ORDER.index(k) >= STAGE_ORDER.index(stage)]
    if unknown or later:
        raise TypeError(f"{STAGES[stage]}.READS: not a recipe key or not an earlier stage: {unknown + later}")
    return tuple(reads)


def recipe_reads(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """The declared keys this recipe's stage reads: a stage may narrow READS per recipe with `reads(recipe)` (e.g.
    route reads the data file only when it labels extra prompts), never widen it."""
    declared = stage_reads(stage)
    narrow = getattr(stage_module(stage), "reads", None)
    if narrow is None:
        return declared
    keys = tuple(narrow(recipe))
    if not set(keys) <= set(declared):
        raise TypeError(f"{STAGES[stage]}.reads(recipe) returned undeclared keys: {sorted(set(keys) - set(declared))}")
    return keys


def upstream_stages(recipe: Recipe, stage: str) -> list[str]:
    """Earlier stages of this recipe whose outputs the stage consumes."""
    return [s for s in stage_reads(stage) if s in STAGE_ORDER and getattr(recipe, s) is not None]


def stage_config_hash(recipe: Recipe, stage: str) -> str:
    public = recipe.public_dict()
    shared = {k: public.get(k) for k in recipe_reads(recipe, stage) if k not in STAGE_ORDER}
    return config_hash({"stage": public[stage], **shared, "optkit": __version__})


def input_digest(path: Path) -> str:
    """A file's sha256; a directory's (a saved dataset, a local model) content identity, so rows or weights
    saved over the same path make the stage run again."""
    from toolkit.models import local_fingerprint

    return sha256_file(path) if path.is_file() else local_fingerprint(path)


@dataclass
class StageContext:
    """What a stage gets: its config, its directory, upstream outputs, and somewhere to log."""

    name: str
    recipe: Recipe
    run_dir: Path
    dir: Path
    tracker: Tracker
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form facts for the manifest

    @property
    def config(self) -> Any:
        return getattr(self.recipe, self.name)

    @property
    def work_dir(self) -> Path:
        """Resumable state (result stores, checkpoints). Kept across interrupted runs; not an output."""
        path = self.dir / WORK
        path.mkdir(parents=True, exist_ok=True)
        return path

    def upstream(self, stage: str) -> Path:
        """Directory of a finished earlier stage; an error if that stage has not finished."""
        path = self.run_dir / stage
        if getattr(self.recipe, stage) is None:
            raise OptkitError(f"stage '{self.name}' needs the outputs of stage '{stage}', but the recipe has no "
                              f"'{stage}' section")
        if not self.has_upstream(stage):
            raise OptkitError(f"stage '{self.name}' needs the outputs of stage '{stage}', which has not finished "
                              f"in {self.run_dir}; run it first (optkit run RECIPE --only {stage})")
        return path

    def has_upstream(self, stage: str) -> bool:
        if stage not in stage_reads(self.name):  # reading undeclared outputs would make skips wrong
            raise TypeError(f"stage '{self.name}' reads the outputs of '{stage}' without declaring it in READS")
        # Only a stage of this recipe: a finished directory left by an earlier recipe in the run dir is not an
        # input (its changes would not re-run this stage: upstream_stages keys skips by the recipe's stages).
        return getattr(self.recipe, stage) is not None and is_done(read_manifest(self.run_dir / stage))

    def add_input(self, path: Path) -> Path:
        """Record a user-supplied input file; a changed file makes the stage run again."""
        path = Path(path)
        if not path.exists():
            raise OptkitError(f"{self.name}: input file not found: {path}")
        self.inputs[str(path.resolve())] = input_digest(path)
        return path

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Headline metrics (no step) go to the manifest too; stepped ones (curves) only to MLflow."""
        if step is None:
            self.metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    @contextlib.contextmanager
    def progress(self, description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
        """A rich progress bar; yields advance(n)."""
        from toolkit.ui import progress_bar

        with progress_bar(f"{self.name}: {description}", total) as advance:
            yield advance


@dataclass
class StageOutcome:
    stage: str
    status: str  # ran | skipped | failed | interrupted
    seconds: float
    metrics: dict[str, Any]
    reason: str = ""


def _is_fresh(run_dir: Path, stage: str, expected_hash: str, upstream_fps: dict[str, str],
              verify: bool) -> tuple[bool, str]:
    manifest = read_manifest(run_dir / stage)
    if manifest is None:
        return False, "not run yet"
    if manifest.get("status") != "done":
        return False, f"previous attempt {manifest.get('status')}"
    if manifest.get("config_hash") != expected_hash:
        return False, "config changed"
    if manifest.get("upstream", {}) != upstream_fps:
        return False, "upstream outputs changed"
    for path, digest in (manifest.get("inputs") or {}).items():
        p = Path(path)
        if not p.exists() or input_digest(p) != digest:
            return False, f"input changed: {path}"
    changed = changed_output(run_dir / stage, manifest.get("outputs"), verify)
    if changed:
        return False, changed
    return True, "unchanged, hashes verified" if verify else "unchanged"


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One optkit process per run directory (filelock: flock on POSIX, msvcrt on Windows)."""
    from filelock import FileLock, Timeout

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / ".lock", timeout=0)
        lock.acquire()
    except Timeout:
        raise OptkitError(f"another optkit run is using {run_dir}") from None
    except OSError as exc:
        raise OptkitError(f"artifacts_dir: cannot write the run directory {run_dir} "
                          f"({exc.strerror or exc}); choose a writable artifacts_dir") from None
    try:
        yield
    finally:
        lock.release()


def select_stages(recipe: Recipe, only: Optional[str], from_stage: Optional[str]) -> tuple[list[str], set[str]]:
    """(stages to consider, stages forced to re-run)."""
    present = recipe.stages()
    if not present:
        raise OptkitError("the recipe has no stage sections (collect, distill, ...): nothing to run")
    for flag, value in (("--only", only), ("--from", from_stage)):
        if value is not None and value not in present:
            raise OptkitError(f"{flag} {value}: not a stage of this recipe (stages: {', '.join(present)})")
    if only:
        return [only], set()
    if from_stage:
        return present, set(present[present.index(from_stage):])
    return present, set()


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.artifacts_dir) / recipe.name


def run_pipeline(recipe: Recipe, only: Optional[str] = None, from_stage: Optional[str] = None,
                 force: bool = False, tracker: Optional[Tracker] = None, verify: bool = False) -> list[StageOutcome]:
    """Run the recipe's stages in order; returns what happened to each.

    verify=True hashes every output (own and upstream) instead of trusting an unchanged size + mtime.
    """
    import yaml

    stages, forced = select_stages(recipe, only, from_stage)
    if force:
        forced = set(stages)
    run_dir = run_dir_for(recipe)
    outcomes: list[StageOutcome] = []
    with _run_lock(run_dir):
        for stage in recipe.stages():  # the lock is ours: whatever says "running" here died
            _guard_disk(lambda: recover(run_dir / stage), run_dir / stage)
        _guard_disk(lambda: atomic_write_text(run_dir / "recipe.yaml",
                                              yaml.safe_dump(recipe.public_dict(), sort_keys=False)), run_dir)
        if tracker is None:
            from toolkit.tracking import make_tracker

            t = recipe.tracking
            tracker = make_tracker(t.enabled, t.uri, t.experiment, Path(recipe.artifacts_dir))
        checked: set[str] = set()  # stages whose outputs were checked (or written) in this invocation
        with tracker.run(recipe.name, tags={"optkit.version": __version__, "optkit.run_dir": str(run_dir)}):
            tracker.log_params(flatten(recipe.public_dict()))
            tracker.log_artifact(run_dir / "recipe.yaml")
            for stage in stages:
                outcome = _run_stage(recipe, stage, run_dir, tracker, stage in forced, verify, checked)
                outcomes.append(outcome)
                # Stage metrics also on the parent run, prefixed, so runs compare in one MLflow table.
                tracker.log_metrics({f"{stage}.{k}": v for k, v in outcome.metrics.items()})
    return outcomes


def _guard_disk(write: Callable[[], None], where: Path) -> None:
    try:
        write()
    except OSError as exc:
        if disk_full(exc):
            raise OptkitError(f"disk full writing {exc.filename or where}: free space and run again") from None
        raise OptkitError(f"cannot write {exc.filename or where} ({exc.strerror or exc})") from None


def _upstream_fingerprints(recipe: Recipe, stage: str, run_dir: Path, verify: bool,
                           checked: set[str]) -> dict[str, str]:
    """Fingerprints of the finished upstream stages; an error if one is unfinished or its files changed.

    Checked before the stage starts, so a stage that cannot run leaves no manifest behind.
    """
    fps = {}
    for up in upstream_stages(recipe, stage):
        m = read_manifest(run_dir / up)
        if not is_done(m):
            raise OptkitError(f"stage '{stage}' needs the outputs of stage '{up}', which has not finished in "
                              f"{run_dir}; run it first (optkit run RECIPE --only {up})")
        if up not in checked:
            changed = changed_output(run_dir / up, m.get("outputs"), verify)
            if changed:
                raise OptkitError(f"stage '{stage}' needs the outputs of stage '{up}', which changed since it "
                                  f"finished ({changed}); re-run it: optkit run RECIPE --from {up}")
            checked.add(up)
        fps[up] = fingerprint(m)
    return fps


def _run_stage(recipe: Recipe, stage: str, run_dir: Path, tracker: Tracker, force: bool, verify: bool = False,
               checked: Optional[set[str]] = None) -> StageOutcome:
    checked = set() if checked is None else checked
    stage_dir = run_dir / stage
    expected = stage_config_hash(recipe, stage)
    upstream_fps = _upstream_fingerprints(recipe, stage, run_dir, verify, checked)
    if not force:
        fresh, reason = _is_fresh(run_dir, stage, expected, upstream_fps, verify)
        if fresh:
            checked.add(stage)
            log.info("%s: skipped (%s)", stage, reason)
            return StageOutcome(stage, "skipped", 0.0, (read_manifest(stage_dir) or {}).get("metrics", {}), reason)
        if reason.startswith("output"):
            log.warning("%s: %s since it finished; running it again", stage, reason)

    module = stage_module(stage)
    started = time.time()
    manifest: dict[str, Any] = {
        "stage": stage, "status": "running", "config_hash": expected, "upstream": upstream_fps,
        "inputs": {}, "outputs": {}, "metrics": {}, "started_at": started, "optkit": __version__,
        "pid": os.getpid(),
    }
    _guard_disk(lambda: (stage_dir.mkdir(parents=True, exist_ok=True), write_manifest(stage_dir, manifest)),
                stage_dir)
    ctx = StageContext(stage, recipe, run_dir, stage_dir, tracker)
    log.info("%s: running", stage)
    with tracker.run(stage, tags={"optkit.stage": stage}):
        try:
            result = module.run(ctx) or {}
            ctx.metrics.update({k: v for k, v in result.items() if k not in ctx.metrics})
            finished = time.time()
            manifest.update(status="done", inputs=ctx.inputs, outputs=hash_outputs(stage_dir), metrics=ctx.metrics,
                            finished_at=finished, seconds=round(finished - started, 3), **ctx.extra)
            manifest["fingerprint"] = fingerprint(manifest)
            write_manifest(stage_dir, manifest)  # the one moment the stage becomes done
        except BaseException as exc:
            _record_failure(stage_dir, manifest, ctx, exc)
            full = disk_full(exc)
            if full is not None:
                where = full.filename or f"under {stage_dir}"
                raise OptkitError(f"disk full: stage '{stage}' could not write {where}; free "
                                  f"space and run the same command again (finished work under {stage_dir / WORK} "
                                  "is kept and resumes)") from None
            raise
        checked.add(stage)
        tracker.log_metrics({"stage_seconds": finished - started,
                             **{k: v for k, v in ctx.metrics.items() if isinstance(v, (int, float))}})
        tracker.log_artifact(stage_dir / MANIFEST)
    return StageOutcome(stage, "ran", finished - started, ctx.metrics)


def _record_failure(stage_dir: Path, manifest: dict, ctx: StageContext, exc: BaseException) -> None:
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    manifest.update(status=status, error=redact(f"{type(exc).__name__}: {exc}")[:2000], outputs={},
                    finished_at=time.time(), inputs=ctx.inputs, metrics=ctx.metrics)
    try:
        write_manifest(stage_dir, manifest)
    except OSError as err:  # e.g. the disk is still full: the next start finds "running" and marks it failed
        log.error("%s: could not record the failure in %s (%s)", ctx.name, MANIFEST, err)
