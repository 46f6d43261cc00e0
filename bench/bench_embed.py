"""Benchmark: the embed stage against the single-process reference, at each precision.

On the same real rows of ../shared/data (a fixed pseudo-random sample, default 5,000), in one run:

(a) the reference: this one process, ``SentenceTransformer.encode(texts, batch_size=32,
    normalize_embeddings=True)`` with torch's default threads (model loaded before the clock
    starts), timed at the start and again at the end of the run;
(b) the embed stage as the pipeline runs it: ``embed_records`` on a Delta ``records`` table plus
    the Delta write of ``embeddings`` through ``TableStore``, Spark ``local[*]``, each precision in
    a fresh Spark session (so each run starts its own Python workers and loads the model there).

It reports rows/s, the ratio to (a), the fidelity of each precision's vectors to (a), the CPU
flags, and the FLOP bound: FLOPs per row of the model at the measured token counts against the
CPU's fp32 peak (theoretical, and measured with a large matrix product). ``--tune`` adds the
measurements behind the stage's defaults (batch size, sort window, threads per task vs tasks,
Arrow batch size, tokenisation and Arrow conversion cost); ``--profile`` where the forward pass
spends its time (torch profiler, one thread). Writes the ``embed`` section of BENCHMARKS.md.

    .venv/bin/python bench/bench_embed.py [--rows 5000] [--tune] [--profile] [--no-write]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import numpy as np  # noqa: E402

from bench._common import write_section  # noqa: E402
from bench.bench_filter import RECORDS_DDL, load_records  # noqa: E402
from mergeit_spark.config import EmbedSettings, load_settings  # noqa: E402
from mergeit_spark import models as M  # noqa: E402
from mergeit_spark.stages import embed as E  # noqa: E402

FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def sample_records(rows: int, seed: int = 9) -> list[dict]:
    records = load_records()
    random.Random(seed).shuffle(records)
    return records[:rows]


def texts_of(records: list[dict]) -> list[str]:
    return [(r["instruction"] + " " + r["input"]).strip() for r in records]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def reference_model(settings: EmbedSettings):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(M.resolve_model_path(settings.model), device="cpu")
    model.max_seq_length = settings.max_seq_length
    return model


def run_reference(model, texts: list[str]) -> tuple[np.ndarray, float]:
    model.encode(texts[:64], batch_size=32)  # warm-up, not timed
    vectors, wall, _ = timed(lambda: model.encode(texts, batch_size=32, normalize_embeddings=True,
                                                  show_progress_bar=False))
    return vectors, wall


def stage_vectors(path: str, ids: list[str]) -> tuple[np.ndarray, set[str]]:
    """The stage's vectors in ``ids`` order, read back by an independent Delta reader."""
    from deltalake import DeltaTable
    table = DeltaTable(path).to_pyarrow_table(columns=["id", "embedding", "precision"])
    where = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return matrix[[where[i] for i in ids]], set(table.column("precision").to_pylist())


def run_stage(settings, records: list[dict], root: Path, label: str, embed: EmbedSettings,
              extra_conf: dict[str, str] | None = None) -> tuple[float, str]:
    """One stage run in a fresh Spark session: records staged as Delta, then embed + Delta write."""
    from mergeit_spark.session import build_session
    from mergeit_spark.tables import TableStore
    spark = build_session(settings.spark, extra_conf)
    try:
        store = TableStore(spark, root / label, settings.tables.engine)
        store.write(spark.createDataFrame(records, RECORDS_DDL), "records")
        source = store.read("records")
        _, wall, _ = timed(lambda: store.write(E.embed_records(source, embed), "embeddings"))
        return wall, store.path("embeddings")
    finally:
        spark.stop()


def cosine_stats(ours: np.ndarray, ref: np.ndarray) -> str:
    cos = (ours * ref).sum(axis=1)
    return f"{cos.mean():.6f} / {cos.min():.6f} / {np.abs(ours - ref).max():.1e}"


def cpu_facts() -> dict:
    import torch
    flags = M.cpu_flags()
    mhz = 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            mhz = float(line.split(":")[1])
            break
    return {"flags": [f for f in FLAGS_SHOWN if f in flags], "mhz": mhz, "cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "auto": M.resolve_precision("auto", "cpu"), "torch_threads": torch.get_num_threads()}


def measured_gemm_gflops(threads: int, n: int = 1536, reps: int = 6) -> float:
    """Sustained fp32 matrix-product rate (torch.mm, n x n) with ``threads`` threads: best of ``reps``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b))[1] for _ in range(reps))
    torch.set_num_threads(before)
    return 2 * n ** 3 / best / 1e9


def token_counts(model, texts: list[str]) -> np.ndarray:
    features = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
    return np.array([len(ids) for ids in features["input_ids"]])


def flops_per_row(model, tokens: np.ndarray) -> float:
    """Forward-pass FLOPs per text at its own (unpadded) length: the six matrix products of each
    layer (Q, K, V, output, FFN up and down) plus the two attention products, 2 FLOPs per MAC."""
    cfg = model[0].auto_model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * inter)
    attention = 2 * 2 * h * (tokens.astype(np.float64) ** 2)  # QK^T and AV: L^2 * h MACs each
    return float(np.mean(layers * (per_token * tokens + attention)))


def padded_tokens(tokens: np.ndarray, order: np.ndarray, batch: int) -> int:
    return int(sum(tokens[order[s:s + batch]].max() * len(order[s:s + batch])
                   for s in range(0, len(order), batch)))


def main() -> None:
    args = parse_args()
    settings = load_settings(overrides=["spark.master=local[*]", *args.overrides])
    records = sample_records(args.rows)
    texts, ids = texts_of(records), [r["id"] for r in records]
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    load_start = os.getloadavg()
    try:
        model = reference_model(settings.embed)
        facts = cpu_facts()
        ref, ref_first = run_reference(model, texts)
        stage: dict[str, tuple[float, str, str]] = {}
        for precision in args.precisions:
            embed = dataclasses.replace(settings.embed, precision=precision)
            wall, path = run_stage(settings, records, root, f"stage_{precision}", embed)
            vectors, used = stage_vectors(path, ids)
            stage[precision] = (wall, ",".join(sorted(used)), cosine_stats(vectors, ref))
            print(f"stage {precision}: {len(ids) / wall:.1f} rows/s ({','.join(sorted(used))})", flush=True)
        _, ref_last = run_reference(model, texts)
        tokens = token_counts(model, texts)
        bound = flop_bound(model, texts, tokens, facts, settings.embed.batch_size)
        tune = tuning(settings, records[:args.tune_rows], model, root) if args.tune else ""
        prof = profile(settings.embed, texts[:args.profile_rows]) if args.profile else ""
        load_end = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = report(settings, len(ids), facts, (ref_first, ref_last), stage, bound, tune, prof,
                  (load_start, load_end))
    print(body)
    if not args.no_write:
        write_section("embed", body)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="real rows embedded by every run")
    parser.add_argument("--precisions", default="fp32,auto,bf16", type=lambda s: s.split(","),
                        help="stage runs, in order (comma-separated)")
    parser.add_argument("--tune", action="store_true", help="also measure the tuning choices")
    parser.add_argument("--tune-rows", type=int, default=2000, help="rows for each tuning measurement")
    parser.add_argument("--profile", action="store_true", help="also profile the forward pass")
    parser.add_argument("--profile-rows", type=int, default=400)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    return parser.parse_args()


def flop_bound(model, texts: list[str], tokens: np.ndarray, facts: dict, batch: int) -> dict:
    per_row = flops_per_row(model, tokens)
    # Zen: two 256-bit FMA pipes per core = 8 fp32 lanes x 2 pipes x 2 FLOPs per FMA per cycle.
    theoretical = facts["cores"] * facts["mhz"] * 1e6 * 32 / 1e9
    gemm = {t: measured_gemm_gflops(t) for t in (1, facts["cores"])}
    by_chars = np.argsort([-len(t) for t in texts], kind="stable")  # what encode does
    by_tokens = np.argsort(tokens, kind="stable")
    return {"tokens_mean": float(tokens.mean()), "tokens_max": int(tokens.max()),
            "gflop_per_row": per_row / 1e9, "theoretical": theoretical, "gemm": gemm,
            "pad_chars32": padded_tokens(tokens, by_chars, 32) / tokens.sum(),
            "pad_tokens": padded_tokens(tokens, by_tokens, batch) / tokens.sum(), "batch": batch}


def tuning(settings, records: list[dict], model, root: Path) -> str:
    """The measurements behind the defaults: one process, one thread (as one Spark task runs),
    then whole-stage runs for threads per task and Arrow batch size."""
    import torch
    texts = texts_of(records)
    n = len(texts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = dataclasses.replace(settings.embed, precision="fp32", torch_threads=0)
    rows = ["| way (one process, 1 thread, fp32 unless said) | rows/s | rows per CPU-s |",
            "| --- | ---: | ---: |"]

    def line(label: str, fn) -> None:
        _, wall, cpu = timed(fn)
        rows.append(f"| {label} | {n / wall:.1f} | {n / cpu:.1f} |")
        print(rows[-1], flush=True)

    line("`encode(batch_size=32)` (reference, character-sorted)",
         lambda: model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False))
    for batch in (16, 32, 64, 128):
        line(f"stage encoder, token-sorted window of {n}, batch {batch}",
             lambda b=batch: M.encode_texts(texts, dataclasses.replace(base, batch_size=b)))
    line(f"stage encoder, windows of 256 rows, batch {base.batch_size}",
         lambda: [M.encode_texts(texts[s:s + 256], base) for s in range(0, n, 256)])
    line(f"stage encoder, arrival order (no sorting), batch {base.batch_size}",
         lambda: M.encode_texts(texts, base, sort_by_length=False))
    line(f"stage encoder, bf16 autocast, batch {base.batch_size}",
         lambda: M.encode_texts(texts, dataclasses.replace(base, precision="bf16")))
    loaded = M.load_model(base)
    _, tok_wall, _ = timed(lambda: M._tokenise(loaded, texts))
    vectors = M.encode_texts(texts, base)
    _, arrow_wall, _ = timed(lambda: E.embedding_lists(vectors))
    torch.set_num_threads(threads)
    notes = [f"Tokenising all {n} texts in one call: {tok_wall:.2f} s ({n / tok_wall:.0f} rows/s); "
             f"vectors to an Arrow list column: {arrow_wall * 1000:.1f} ms."]
    return "\n".join(rows + [""] + notes + ["", spark_tuning(settings, records, root)])


def spark_tuning(settings, records: list[dict], root: Path) -> str:
    n = len(records)
    rows = ["| whole stage, fp32 (Spark local[*], Delta write) | rows/s |", "| --- | ---: |"]
    variants = [("2 tasks x 1 torch thread (default)", {}, {}),
                ("1 task x 2 torch threads", {"partitions": 1, "torch_threads": 2}, {}),
                ("4 tasks x 1 torch thread", {"partitions": 4}, {}),
                ("2 tasks x 1 thread, Arrow batches of 1,000 rows",
                 {}, {"spark.sql.execution.arrow.maxRecordsPerBatch": "1000"})]
    for label, knobs, conf in variants:
        embed = dataclasses.replace(settings.embed, precision="fp32", **knobs)
        wall, _ = run_stage(settings, records, root, f"tune_{len(rows)}", embed, conf)
        rows.append(f"| {label} | {n / wall:.1f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def profile(embed: EmbedSettings, texts: list[str]) -> str:
    """Self CPU time of the forward pass by kind of operator (torch profiler, one thread, fp32),
    and the rate the linear layers reach (their FLOPs over the padded tokens actually computed)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = dataclasses.replace(embed, precision="fp32", torch_threads=0)
    model = M.load_model(settings)
    M.encode_texts(texts[:32], settings)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _, wall, _ = timed(lambda: M.encode_texts(texts, settings))
    torch.set_num_threads(threads)
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        groups[op_kind(event.key)] = groups.get(op_kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    rows = ["| operators | self CPU s | share |", "| --- | ---: | ---: |"]
    rows += [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    tokens = token_counts(model, texts)
    cfg = model[0].auto_model.config
    linear_flops = (cfg.num_hidden_layers * 2 * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)
                    * padded_tokens(tokens, np.argsort(tokens, kind="stable"), settings.batch_size))
    rate = linear_flops / groups.get("linear layers (GEMM)", float("nan")) / 1e9
    return (f"{len(texts)} texts, {wall:.1f} s wall under the profiler, 1 thread; the linear layers ran at "
            f"{rate:.0f} GFLOP/s.\n\n" + "\n".join(rows))


def op_kind(name: str) -> str:
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise"):
        return "linear layers (GEMM)"
    if "attention" in name or name in ("aten::bmm", "aten::baddbmm", "aten::_softmax"):
        return "attention (SDPA)"
    if "layer_norm" in name:
        return "layer norm"
    if "gelu" in name:
        return "GELU"
    if name in ("aten::copy_", "aten::index_select", "aten::to", "aten::_to_copy", "aten::cat",
                "aten::contiguous", "aten::clone"):
        return "copies, gathers"
    return "other (adds, views, pooling, embedding lookup)"


def report(settings, n, facts, refs, stage, bound, tune, prof, loads) -> str:
    ref_rate = n / (sum(refs) / 2)
    lines = [
        f"{n} real rows of ../shared/data (fixed pseudo-random sample), all-MiniLM-L6-v2, "
        f"max_seq_length {settings.embed.max_seq_length}, stage batch {settings.embed.batch_size}, "
        f"sort window {settings.embed.sort_window_rows} rows, torch_threads {settings.embed.torch_threads} "
        f"per task, Spark `local[*]` on {facts['cores']} cores.",
        f"CPU flags found: {', '.join(facts['flags']) or 'none of ' + ', '.join(FLAGS_SHOWN)}; torch CPU "
        f"capability {facts['torch_capability']}; `auto` resolves to **{facts['auto']}** here.",
        f"Load average (1 min) {loads[0][0]:.1f} at start, {loads[1][0]:.1f} at the end: other work shares "
        "the CPU, so compare ratios, not absolute rates.", "",
        "| run | rows/s | vs reference | precision recorded | cosine to reference: mean / min / max abs diff |",
        "| --- | ---: | ---: | --- | --- |",
        f"| (a) reference `encode(batch_size=32)`, one process, {facts['torch_threads']} torch threads "
        f"(first / last) | {n / refs[0]:.1f} / {n / refs[1]:.1f} | 1.00x | fp32 | 1 / 1 / 0 |"]
    for precision, (wall, used, fidelity) in stage.items():
        lines.append(f"| (b) embed stage, `embed.precision={precision}` | {n / wall:.1f} | "
                     f"**{n / wall / ref_rate:.2f}x** | {used} | {fidelity} |")
    # Two single-thread tasks at the one-thread rate each: the most the measured GEMM rate allows.
    peak = max(bound["gemm"][facts["cores"]], facts["cores"] * bound["gemm"][1])
    lines += ["", f"Ratios use the mean of the two reference timings ({ref_rate:.1f} rows/s). Stage times "
              "include starting Python workers, loading the model in each, the shuffle, and the Delta write.",
              "", "FLOP bound: " + flop_text(bound, facts, ref_rate, peak)]
    if tune:
        lines += ["", "Tuning measurements:", "", tune]
    if prof:
        lines += ["", "Where a forward pass spends its time: " + prof]
    return "\n".join(lines)


def flop_text(bound: dict, facts: dict, ref_rate: float, peak: float) -> str:
    theo = bound["theoretical"]
    return (f"{bound['tokens_mean']:.1f} tokens per row on average (max {bound['tokens_max']}); the model "
            f"does {bound['gflop_per_row']:.3f} GFLOP per row at those lengths without padding. "
            f"Theoretical fp32 peak {theo:.0f} GFLOP/s ({facts['cores']} cores x {facts['mhz'] / 1000:.2f} GHz, the "
            f"clock /proc/cpuinfo reports, "
            f"x 32 FLOP/cycle: two 256-bit FMA pipes); a large `torch.mm` sustains "
            f"{bound['gemm'][1]:.0f} GFLOP/s on 1 thread, {bound['gemm'][facts['cores']]:.0f} on {facts['cores']}. "
            f"So no fp32 run on this CPU can pass {theo / bound['gflop_per_row']:.0f} rows/s "
            f"({theo / bound['gflop_per_row'] / ref_rate:.2f}x the reference) even at the theoretical peak, "
            f"or {peak / bound['gflop_per_row']:.0f} rows/s ({peak / bound['gflop_per_row'] / ref_rate:.2f}x) at "
            f"the measured GEMM rate ({peak:.0f} GFLOP/s: {facts['cores']} cores at the one-thread rate). "
            f"Padding: character-sorted batches of 32 (the reference) compute "
            f"{bound['pad_chars32']:.2f}x the real tokens, token-sorted batches of {bound['batch']} (the stage, "
            f"one window) {bound['pad_tokens']:.2f}x.")


if __name__ == "__main__":
    main()
