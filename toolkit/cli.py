"""`optkit` command line. Thin on purpose: parse, then call the library. Heavy imports happen inside the
command that needs them, so `optkit --help` stays fast."""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port (1-65535)")
    return int(text)


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError("want the 64 hex digits export printed")
    return text.lower()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optkit", description="LLM optimization pipeline: collect → distill → "
                                "quantize → route → cache → evaluate → export, from one YAML recipe.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (finished stages with unchanged inputs are skipped)")
    run.add_argument("recipe", help="path to the recipe YAML")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values (a relative "
                     "path resolves against the recipe's folder, as in the file)")
    g = run.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STAGE", help="run only this stage")
    g.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and all after it")
    run.add_argument("--force", action="store_true", help="re-run stages even when they are up to date")
    run.add_argument("--verify", action="store_true", help="hash every finished output before trusting it (default:"
                     " hash only files whose size or mtime differ from the manifest)")

    val = sub.add_parser("validate", help="check a recipe (and the prompts file collect reads) without running it")
    val.add_argument("recipe")
    val.add_argument("overrides", nargs="*", metavar="key.path=value")

    sub.add_parser("schema", help="print the recipe reference (every key, type, default, description)")

    rep = sub.add_parser("report", help="print a finished run's summary: stages and the evaluate table")
    rep.add_argument("run", help="run directory (artifacts/<name>), run name, or recipe file")
    cmp_ = sub.add_parser("compare", help="show what changed between two runs (recipe, stages, metrics)")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")
    ver = sub.add_parser("verify", help="check an exported bundle against its manifest (exit 1 on any mismatch)")
    ver.add_argument("bundle", help="bundle directory (artifacts/<name>/export/bundle)")
    ver.add_argument("--manifest-sha256", metavar="HEX", type=_sha256, help="also require manifest.json to have "
                     "this sha256 (printed at export)")
    ev = sub.add_parser("evaluate", help="score a bundle's variants and system on a new labeled file (quality with "
                        "95%% intervals, agreement, latency, cost)")
    ev.add_argument("bundle", help="bundle directory (artifacts/<name>/export/bundle)")
    ev.add_argument("--data", required=True, metavar="FILE", help="labeled file in the bundle recipe's data format "
                    "(same columns; override them with data.prompt_column=... etc.)")
    ev.add_argument("--out", required=True, metavar="DIR", help="output directory (report.md, variants.json, ...)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                    help="override a value of the bundle's recipe (repeatable), e.g. --set data.reference_column=label")
    srv = sub.add_parser("serve", help="serve a bundle as one OpenAI-compatible endpoint (cache -> router -> "
                         "student/teacher)")
    srv.add_argument("bundle", help="bundle directory (artifacts/<name>/export/bundle)")
    srv.add_argument("--config", metavar="serve.yaml", help="backends and policy (default: the bundle's serve.yaml)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8080)
    return p


def _cmd_serve(args) -> int:
    from toolkit import runtime

    runtime.configure()  # before an embedder can import torch
    from toolkit.serve.server import serve

    return serve(args.bundle, args.config, args.host, args.port)


def _cmd_evaluate(args) -> int:
    from toolkit import runtime

    runtime.configure()  # before anything imports torch
    runtime.setup_logging()
    from toolkit.evaluate.bundle import evaluate_bundle

    report = evaluate_bundle(args.bundle, args.data, args.out, args.overrides)
    print(f"report: {report}")
    return 0


def _cmd_validate(args) -> int:
    from toolkit.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok — run '{recipe.name}', stages: {', '.join(recipe.stages()) or '(none)'}"
          f"{_prompts_line(recipe)}")
    return 0


def _prompts_line(recipe) -> str:
    """The data file read as collect will read it (columns, template, ids, splits): its mistakes surface now,
    not after `run` has started. A traffic-log collect reads its log instead, at run time."""
    if recipe.collect is None or recipe.collect.backend == "log":
        return ""
    from collections import Counter

    from toolkit.collect.prompts import data_file, load_prompts

    n = Counter(p.split for p in load_prompts(recipe.data, data_file(recipe), recipe.seed))
    return f"; {sum(n.values())} prompts (train {n['train']}, val {n['val']}, test {n['test']})"


def _cmd_run(args) -> int:
    from toolkit.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from toolkit import runtime

    runtime.configure(recipe.runtime.threads, recipe.runtime.offline)  # before anything imports torch
    runtime.setup_logging()
    from toolkit.pipeline import run_dir_for, run_pipeline
    from toolkit.ui import print_summary

    outcomes = run_pipeline(recipe, only=args.only, from_stage=args.from_stage, force=args.force,
                            verify=args.verify)
    print_summary(run_dir_for(recipe), outcomes)
    return 0


def _cmd_schema(args) -> int:
    from toolkit.config import schema_reference

    print("| key | type | default | description |\n|---|---|---|---|")
    print("\n".join(schema_reference()))
    return 0


def _cmd_report(args) -> int:
    from toolkit.evaluate.summary import find_run, report_text

    print(report_text(find_run(args.run)))
    return 0


def _cmd_compare(args) -> int:
    from toolkit.evaluate.summary import compare_text, find_run

    print(compare_text(find_run(args.run_a), find_run(args.run_b)))
    return 0


def _cmd_verify(args) -> int:
    from toolkit.bundle import BundleIntegrityError, verify_bundle

    try:
        problems = verify_bundle(args.bundle, args.manifest_sha256)
    except BundleIntegrityError as exc:  # a corrupt manifest is a failed check (exit 1), not a usage error
        from toolkit.runtime import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        print(f"{args.bundle}: {len(problems)} problem(s); do not deploy this bundle", file=sys.stderr)
        return 1
    print(f"{args.bundle}: ok, every file matches manifest.json")
    return 0


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "schema": _cmd_schema, "report": _cmd_report,
            "compare": _cmd_compare, "verify": _cmd_verify, "serve": _cmd_serve,
            "evaluate": _cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `run r.yaml --only collect seed=3`: overrides after an option are still overrides
        if args.command not in ("run", "validate") or any(t.startswith("-") or "=" not in t for t in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if args.version:
        from toolkit import __version__

        print(f"optkit {__version__}")
        return 0
    if args.command is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    from toolkit.errors import OptkitError
    from toolkit.runtime import redact

    try:
        return COMMANDS[args.command](args)
    except OptkitError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback for the report, but never with a credential in it
        import traceback

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
