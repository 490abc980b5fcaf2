"""Terminal output: rich progress bars for long steps and the one-screen run summary."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Optional


def console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    # No bar when nobody watches (CI, pipes): a live display only adds noise to logs.
    disable = not sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console(), disable=disable, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def fmt(v, digits: int = 3, missing: str = "n/a") -> str:
    """The one number formatter for tables, reports and the model card: floats to `digits` significant
    digits, None as `missing`, booleans as yes/blank, anything else as str()."""
    if v is None:
        return missing
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def print_summary(run_dir, outcomes, max_metrics: int = 6) -> None:
    from rich.table import Table

    table = Table(title=f"optkit run — {run_dir}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("headline metrics")
    for o in outcomes:
        shown = [f"{k}={fmt(v, 4)}" for k, v in list(o.metrics.items())[:max_metrics]
                 if isinstance(v, (int, float, str))]
        status = {"ran": "[green]ran[/]", "skipped": f"[cyan]skipped[/] ({o.reason})"}.get(o.status, o.status)
        table.add_row(o.stage, status, f"{o.seconds:.1f}", ", ".join(shown))
    console().print(table)
    command = serve_command(run_dir, outcomes)
    if command:
        console().print(f"Serve it (cache -> router -> models, OpenAI-compatible): {command}", soft_wrap=True,
                        markup=False, highlight=False)


def serve_command(run_dir, outcomes, port: int = 8080) -> Optional[str]:
    """The command that serves the run's bundle, when its export stage ran (or is up to date) this time."""
    import shlex
    from pathlib import Path

    from toolkit.export import BUNDLE

    done = any(o.stage == "export" and o.status in ("ran", "skipped") for o in outcomes)
    bundle = Path(run_dir) / "export" / BUNDLE
    if not done or not (bundle / "manifest.json").is_file():
        return None
    return f"optkit serve {shlex.quote(str(bundle))} --port {port}"
