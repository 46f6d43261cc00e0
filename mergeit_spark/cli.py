"""The ``mergeit`` command: run, status, report, export, config, llm serve."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import SettingsError, describe, dump_yaml, load_settings

log = logging.getLogger("mergeit")


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="settings profile (YAML); repeat to layer several, later wins")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set topics.k=50; repeatable")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (or one stage), resuming where it stopped")
    _settings_args(run)
    run.add_argument("--stage", help="run only this stage (its inputs must exist)")
    run.add_argument("--force", metavar="STAGE", help="recompute from this stage on, whatever the state")
    run.add_argument("--serve-llm", action="store_true",
                     help="start the bundled local LLM server for the run (server.*), point llm.base_url at it")
    run.add_argument("--report", action="store_true", help="write the report after the run")
    run.add_argument("--export", choices=("alpaca-json", "jsonl", "parquet"),
                     help="export `final` after the run to <root>/export")

    status = sub.add_parser("status", help="which stages are done, row counts, table versions")
    _settings_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    report = sub.add_parser("report", help="write report.json, PNGs and report.html under <root>/report")
    _settings_args(report)

    export = sub.add_parser("export", help="export the `final` table")
    _settings_args(export)
    export.add_argument("--format", required=True, choices=("alpaca-json", "jsonl", "parquet"))
    export.add_argument("--out", help="output path (default <root>/export/final.<ext>)")

    config = sub.add_parser("config", help="show the effective settings, or describe every knob")
    _settings_args(config)
    config.add_argument("what", choices=("show", "describe"), nargs="?", default="show")

    llm = sub.add_parser("llm", help="local OpenAI-compatible LLM server")
    llm_sub = llm.add_subparsers(dest="llm_command", required=True)
    serve = llm_sub.add_parser("serve", help="serve the bundled SmolLM2 GGUF on server.host:server.port")
    _settings_args(serve)
    return parser


def _setup_logging(root: Path | None) -> Path | None:
    logger = logging.getLogger("mergeit")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    if root is None:
        return None
    log_dir = root / "_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    return path


def _export_path(root: Path, fmt: str, out: str | None) -> Path:
    if out:
        return Path(out)
    ext = {"alpaca-json": "json", "jsonl": "jsonl", "parquet": "parquet"}[fmt]
    return root / "export" / f"final.{ext}"


def main(argv: Sequence[str] | None = None) -> int:
    # Nothing downloads at run time: models load from installed packages or configured paths.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.conf, args.overrides)
    except SettingsError as exc:
        print(f"mergeit: bad settings: {exc}", file=sys.stderr)
        return 2
    root = Path(settings.output.root).absolute()

    if args.command == "config":
        if args.what == "describe":
            for key, default, doc in describe():
                print(f"{key} = {default!r}\n    {doc}")
        else:
            print(dump_yaml(settings), end="")
        return 0

    if args.command == "llm":
        from .llm.server import serve_forever
        _setup_logging(None)
        serve_forever(settings.server)
        return 0

    log_path = _setup_logging(root if args.command == "run" else None)
    if log_path:
        log.info("log file: %s", log_path)

    from .pipeline import Pipeline, PipelineError

    if args.command == "run":
        server = None
        if args.serve_llm:
            from .llm.server import LocalLLMServer
            server = LocalLLMServer(settings.server)
            server.start()
            settings.llm.base_url = server.base_url
            log.info("local LLM server up at %s", server.base_url)
        try:
            pipeline = Pipeline(settings)
            results = pipeline.run(only=args.stage, force=args.force)
        except (PipelineError, ValueError, FileNotFoundError) as exc:
            log.error("run failed: %s", exc)
            return 1
        finally:
            if server is not None:
                server.stop()
        for r in results:
            state = "skipped" if r.skipped else f"{r.seconds:.1f}s"
            counts = ", ".join(f"{t}={n}" for t, n in r.counts.items())
            print(f"{r.name:<9} {state:>8}  {counts}")
        print(f"tables under {root}")
        if args.report:
            print(f"report: {_write_report(pipeline)}")
        if args.export:
            from .export import export_final
            path = export_final(pipeline.store, _export_path(root, args.export, None), args.export)
            print(f"export: {path}")
        return 0

    pipeline = Pipeline(settings)
    if args.command == "status":
        rows = pipeline.status()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                mark = "current" if row["current"] else ("stale" if row["done"] else "not run")
                counts = ", ".join(f"{t}={n}" for t, n in row["counts"].items())
                versions = ", ".join(f"{t}@v{v}" for t, v in row["versions"].items() if v is not None)
                print(f"{row['stage']:<9} {mark:<8} {counts:<40} {versions}")
        return 0
    if args.command == "report":
        print(f"report: {_write_report(pipeline)}")
        return 0
    if args.command == "export":
        from .export import export_final
        path = export_final(pipeline.store, _export_path(root, args.format, args.out), args.format)
        print(f"export: {path}")
        return 0
    return 2


def _write_report(pipeline) -> Path:
    from .report import build_report
    summaries = {name: (pipeline.state(name) or {}).get("summary", {}) for name in pipeline.stage_names()}
    return build_report(pipeline.store, pipeline.root / "report", pipeline.settings,
                        timings=pipeline.timings(), extra={"stage_summaries": summaries})


if __name__ == "__main__":
    sys.exit(main())
