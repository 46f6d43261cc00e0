"""The ``mergeit`` command: run, plan, status, report, export, config, llm serve, ledger compact, stop.

Exit codes of ``mergeit run``: 0 done; 1 the run failed (bad input, an unreachable LLM server, a
ledger that does not balance, the bundled LLM server died); 2 bad settings; 3 every table was
written but more merge groups failed than ``merge.max_failed_share`` allows, for reasons a rerun
can fix (the message names the top errors; running the same command again retries them).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from .config import Settings, SettingsError, describe, dump_yaml, load_settings
from .session import cancel_jobs
from .fs import Location, Storage, resolve
from .redact import install_log_scrubbing

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
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (e.g. --until select: filtering only)")
    run.add_argument("--serve-llm", action="store_true",
                     help="start the bundled local LLM server for the run (server.*), point llm.base_url at it")
    run.add_argument("--report", action="store_true", help="write the report after the run")
    run.add_argument("--retry-failed", dest="overrides", action="append_const", const="merge.retry_failed=true",
                     help="also re-request merge groups whose reply stayed invalid after every regeneration")
    run.add_argument("--incremental", action="store_true",
                     help="add the inputs not yet ingested to a finished run root, without recomputing it")
    run.add_argument("--recluster", action="store_true",
                     help="with --incremental: after adding the new rows, refit topics and rerun every stage below")
    run.add_argument("--export", choices=("alpaca-json", "jsonl", "parquet"),
                     help="export `final` after the run to <root>/export")

    plan = sub.add_parser("plan", help="run up to `group`, then say what the merge stage will send and cost")
    _settings_args(plan)
    plan.add_argument("--sample", type=int, default=20, metavar="N",
                      help="first merge N unpaid groups for real (recorded in the ledger, never paid again) "
                           "to measure tokens, regenerations, gate pass rate and latency (default 20; 0 sends "
                           "nothing)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
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
    _ledger_args(sub)
    _stop_args(sub)
    return parser


def _log_dir(root: Location) -> Path:
    """Where this run's logs are written: ``<root>/_logs`` on a local root; elsewhere a local
    folder, copied to ``<root>/_logs`` when the run ends (object stores cannot append)."""
    if root.local is not None:
        return Path(root.local) / "_logs"
    return Path(tempfile.mkdtemp(prefix="mergeit-logs-"))


def _keep_logs(root: Location, log_dir: Path) -> None:
    if root.local is None:
        try:
            (root / "_logs").upload(log_dir)
        except OSError as exc:
            log.warning("could not copy the logs in %s to %s: %s", log_dir, root / "_logs", exc)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the one of the first
    command: a program that calls :func:`main` and swaps its streams meanwhile keeps its logs."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(log_dir: Path | None) -> Path | None:
    logger = logging.getLogger("mergeit")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
        console = _StderrHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(console)
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    return path


def _export_path(root: Location, fmt: str, out: str | None) -> str | Location:
    if out:
        return out
    ext = {"alpaca-json": "json", "jsonl": "jsonl", "parquet": "parquet"}[fmt]
    return root / "export" / f"final.{ext}"


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything logs: every record of this process has secrets and URL credentials masked.
    install_log_scrubbing()
    # Nothing downloads at run time: models load from installed packages or configured paths.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.conf, args.overrides)
    except SettingsError as exc:
        print(f"mergeit: bad settings: {exc}", file=sys.stderr)
        return 2
    command = f"llm_{args.llm_command}" if args.command == "llm" else args.command
    return _COMMANDS[command](args, settings)


def _config(args: argparse.Namespace, settings: Settings) -> int:
    if args.what == "describe":
        for key, default, doc in describe():
            print(f"{key} = {default!r}\n    {doc}")
    else:
        print(dump_yaml(settings), end="")  # credentials masked
    return 0


def _llm_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .llm.server import serve_forever
    _setup_logging(None)
    serve_forever(settings.server)
    return 0


EXIT_FAILED = 1
EXIT_FAILED_SHARE = 3


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .pipeline import PipelineError

    root = resolve(settings.output.root, Storage.from_settings(settings.storage))
    log_dir = _log_dir(root)
    log_path = _setup_logging(log_dir)
    log.info("log file: %s", log_path)
    server = None
    try:
        if args.serve_llm:
            server = _start_server(settings, log_dir)
        pipeline = _pipeline_for(settings, server)
        if args.incremental:
            code = _run_incremental(pipeline, args)
        else:
            code = _run_full(pipeline, args)
    except Exception as exc:  # noqa: BLE001 - every failure ends as a message and an exit code
        if server is not None and server.died:
            log.error("run failed: %s", server.death_message())
            return EXIT_FAILED
        if not isinstance(exc, (PipelineError, ValueError, FileNotFoundError, RuntimeError)):
            raise
        log.error("run failed: %s", exc)
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()
        _keep_logs(root, log_dir)
    if server is not None and server.died:
        log.error("run failed: %s", server.death_message())
        return EXIT_FAILED
    return code


def _start_server(settings: Settings, log_dir: Path):
    """The bundled LLM server for this run, its output in the run's log folder."""
    from .llm.server import LocalLLMServer
    server = LocalLLMServer(settings.server, log_file=log_dir / f"llm-server-{time.strftime('%Y%m%d-%H%M%S')}.log")
    server.start()
    settings.llm.base_url = server.base_url
    log.info("local LLM server up at %s (log: %s)", server.base_url, server.log_file)
    return server


def _pipeline_for(settings: Settings, server):
    """The pipeline; with a local server, its death cancels the run's Spark jobs at once."""
    from .pipeline import Pipeline
    pipeline = Pipeline(settings)
    if server is not None:
        server.watch(lambda message: (log.error("%s: cancelling the run", message),
                                      cancel_jobs(pipeline.spark)))
    return pipeline


def _run_full(pipeline, args: argparse.Namespace) -> int:
    results = pipeline.run(only=args.stage, force=args.force, until=args.until)
    for r in results:
        state = "skipped" if r.skipped else f"{r.seconds:.1f}s"
        counts = ", ".join(f"{t}={n}" for t, n in r.counts.items())
        print(f"{r.name:<9} {state:>8}  {counts}")
    print(f"tables under {pipeline.root}")
    _after_run(pipeline, args)
    return _shortfall_code([(r.name, r.shortfall) for r in results])


def _after_run(pipeline, args: argparse.Namespace) -> None:
    if args.report:
        from .report import write_report
        print(f"report: {write_report(pipeline)}")
    if args.export:
        _export_final(pipeline, args.export, None)


def _run_incremental(pipeline, args: argparse.Namespace) -> int:
    from .pipeline import PipelineError
    if args.stage or args.force or args.until:
        raise PipelineError("--incremental takes no --stage, --force or --until")
    result = pipeline.extend(recluster=args.recluster)
    if not result.changed:
        print("no new input: nothing changed")
        _after_run(pipeline, args)
        return 0
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    print(f"increment {result.run_id}: {len(result.new_inputs)} new input(s); {counts}")
    if result.drift:
        print(f"drift: {result.drift['far']}/{result.drift['rows']} new rows beyond p{100 * result.drift['quantile']:g}"
              f" ({100 * result.drift['share']:.1f}%)" + ("; full re-cluster advised (--recluster)"
                                                          if result.drift["recluster_advised"] else ""))
    print(f"tables under {pipeline.root}")
    _after_run(pipeline, args)
    return _shortfall_code([(name, (pipeline.state(name) or {}).get("shortfall")) for name in pipeline.stage_names()])


def _shortfall_code(shortfalls: list[tuple[str, dict | None]]) -> int:
    """Log each stage's unfinished work; exit 3 when one is past its tolerance."""
    code = 0
    for name, short in shortfalls:
        if short:
            beyond = short.get("beyond_tolerance")
            (log.error if beyond else log.warning)("%s: %s", name, short["message"])
            code = EXIT_FAILED_SHARE if beyond else code
    return code


def _plan(args: argparse.Namespace, settings: Settings) -> int:
    from .pipeline import PipelineError
    from .plan import plan_merge
    if args.sample < 0:
        print("mergeit: --sample takes a count >= 0", file=sys.stderr)
        return 2
    try:
        planned = plan_merge(_pipeline(settings), sample=args.sample)
    except (PipelineError, ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("plan failed: %s", exc)
        return EXIT_FAILED
    print(json.dumps(planned.as_dict(), indent=2) if args.json else planned.table())
    if not args.json:
        print("\nrecorded in the run root's log `plans`: `mergeit report` sets it against what the merge "
              "stage sends next")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    rows = _pipeline(settings).status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = ("current" if row["current"] else "retry" if row.get("shortfall")
                else "stale" if row["done"] else "not run")
        counts = ", ".join(f"{t}={n}" for t, n in row["counts"].items())
        versions = ", ".join(f"{t}@v{v}" for t, v in row["versions"].items() if v is not None)
        print(f"{row['stage']:<9} {mark:<8} {counts:<40} {versions}")
    return 0


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from .report import write_report
    print(f"report: {write_report(_pipeline(settings))}")
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    _export_final(_pipeline(settings), args.format, args.out)
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "config": _config, "llm_serve": _llm_serve, "run": _run, "status": _status, "report": _report,
    "export": _export, "plan": _plan,
}


# -- mergeit ledger compact ----------------------------------------------------------------------
def _ledger_args(sub) -> None:
    ledger = sub.add_parser("ledger", help="maintain the merge ledger under <root>/_ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    compact = ledger_sub.add_parser("compact", help="fold each ledger bucket's objects into one (takes the "
                                    "run root's lease: never while a run is going)")
    _settings_args(compact)


def _ledger(args: argparse.Namespace, settings: Settings) -> int:
    from .lease import RootBusy, RunLease
    from .llm.ledger import compact
    from .stages.merge import LEDGER_NAME
    store = _pipeline(settings).store
    ledger = store.ledger_path(LEDGER_NAME)
    try:
        with RunLease(store, settings.run.lease_timeout_s):
            done = compact(ledger)
    except RootBusy as exc:
        print(f"mergeit: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ledger {ledger}: {done['objects_before']} objects -> {done['objects_after']} "
          f"in {done['buckets']} buckets")
    return 0


_COMMANDS["ledger"] = _ledger


# -- mergeit stop ----------------------------------------------------------------------------------
def _stop_args(sub) -> None:
    stop = sub.add_parser("stop", help="ask the merge stage running under the run root to stop sending "
                          "(like Ctrl-C on its driver): what was paid is kept, the next run continues")
    _settings_args(stop)


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    from .llm.stop import ask_stop
    from .stages.merge import LEDGER_NAME
    from .tables import LEDGER_DIR
    root = resolve(settings.output.root, Storage.from_settings(settings.storage))
    marker = ask_stop(root / LEDGER_DIR / LEDGER_NAME)
    print(f"stop asked: {marker}")
    return 0


_COMMANDS["stop"] = _stop


def _pipeline(settings: Settings):
    from .pipeline import Pipeline
    _setup_logging(None)
    return Pipeline(settings)


def _export_final(pipeline, fmt: str, out: str | None) -> None:
    from .export import export_final
    path = export_final(pipeline.store, _export_path(pipeline.root, fmt, out), fmt)
    print(f"export: {path}")


if __name__ == "__main__":
    sys.exit(main())
