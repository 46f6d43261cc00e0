"""The run report: what each stage kept, what happened to every row, what merging cost.

``build_report`` reads the stage tables under a run root and writes into ``out_dir``:

* ``report.json``: counts per stage and per fate, input rows (ingest's own count of the input
  files' units, from ``input_files``), rejects by reason, decontamination per evaluation set
  (items, records removed, merges rejected, the most matched items, examples; ``{"eval_sets": 0}``
  when the run was not checked), embedding precision, k, PCA components,
  cluster sizes, merge outcomes, rejections per gate check, tokens, latency, the ledger check,
  timings, the settings (credentials masked); with a plan recorded (``mergeit plan``),
  ``merging.plan_vs_actual``: its figures against what the merge passes after it sent;
* ``funnel.png``, ``cluster_sizes.png``, ``topic_map.png``, ``merge_examples.png``;
* ``report.html``: one self-contained page (CSS inline, the PNGs inlined as data URIs).

Only aggregates (group-by counts over a handful of keys, one row per cluster) and small samples
(``report.topic_map_sample`` embeddings, ``report.examples`` merges) reach the driver. Any table
that is missing (a run stopped early) leaves its section out instead of failing the report.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display on drivers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401 - FuncFormatter for thousands separators
import numpy as np  # noqa: E402
from pyspark.sql import DataFrame, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from .config import Settings  # noqa: E402
from .redact import redact_settings  # noqa: E402
from .stages.finalize import FATES, INPUT_FILES, LedgerError, check_store_ledger  # noqa: E402
from .tables import TableStore  # noqa: E402

if TYPE_CHECKING:
    from .pipeline import Pipeline

STAGE_TABLES = (INPUT_FILES, "records", "rejects", "eval_items", "eval_ngrams", "contamination", "embeddings",
                "topics", "centroids", "dedup", "selected", "merge_groups", "merges", "final", "lineage")
PICTURES = ("funnel", "cluster_sizes", "topic_map", "merge_examples")
TOP_ERRORS = 5          # distinct merge error messages listed in the report
INPUT_FILES_LISTED = 50  # input sources listed one by one (the totals cover all of them)
EXAMPLE_FIELD_CHARS = 600  # characters of one field shown in a merge example
TOP_MATCHED_ITEMS = 5      # most matched evaluation items listed per evaluation set
DECONTAM_EXAMPLES = 3      # contaminated records shown per evaluation set
DECONTAM_TEXT_CHARS = 200  # characters of an item's text, a record's instruction, a match

_COLOURS = {"input": "#9aa5b1", "records": "#5b8def", "decontam": "#8c6bb1", "dedup": "#3fa796",
            "selected": "#e0a030", "original": "#4c72b0", "merged": "#dd5555"}
DECONTAM_STEP = "after decontamination"
_STEP_COLOURS = {"input rows": _COLOURS["input"], "records (valid, unique)": _COLOURS["records"],
                 DECONTAM_STEP: _COLOURS["decontam"], "kept after dedup": _COLOURS["dedup"],
                 "selected": _COLOURS["selected"]}


# --------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------

def _counts_by(df: DataFrame, column: str) -> dict[str, int]:
    """``{value: count}`` for a low-cardinality column (status, fate, reason)."""
    rows = df.groupBy(column).count().collect()
    return {str(r[column]): int(r["count"]) for r in sorted(rows, key=lambda r: -r["count"])}


def _num(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def collect_report_data(store: TableStore, settings: Settings, timings: dict | None = None,
                        extra: dict | None = None) -> dict[str, Any]:
    """Every number of the report, as a JSON-ready dict (aggregates only)."""
    have = {name for name in STAGE_TABLES if store.exists(name)}
    t = {name: store.read(name) for name in have}
    data: dict[str, Any] = {
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_root": str(store.root),
        "tables": {name: {"rows": store.count(name), "version": store.version(name)} for name in sorted(have)},
    }
    rows = {name: info["rows"] for name, info in data["tables"].items()}
    data.update(_input_numbers(t))
    data.update(_row_numbers(t))
    data["decontamination"] = decontam_numbers(t, settings.decontam.min_item_words)
    data["topics"] = _topic_numbers(t, rows)
    data["merging"] = _merge_numbers(t)
    data["merging"].update(_spend_numbers(store, settings, data["merging"]))
    against = plan_against_actual(store)
    if against is not None:
        data["merging"]["plan_vs_actual"] = against
    data["funnel"] = _funnel(data, rows)
    if {"records", "rejects", "lineage", "final"} <= have:
        try:
            data["ledger"] = {"balanced": True, **check_store_ledger(store)}
        except LedgerError as err:
            data["ledger"] = {"balanced": False, "problems": err.problems, **err.summary}
    data["timings"] = timings or {}
    data["extra"] = dict(extra or {})
    data["settings"] = redact_settings(settings.to_dict(), [settings.llm.api_key_env])
    return data


def _input_numbers(t: dict[str, DataFrame]) -> dict[str, Any]:
    """The input as ingest counted it, independently of parsing: units (lines, array elements,
    source rows) and bytes per input source, and their totals."""
    if INPUT_FILES not in t:
        return {}
    files = t[INPUT_FILES]
    total = files.agg(F.count(F.lit(1)).alias("files"), F.sum("units").alias("units"),
                      F.sum("bytes").alias("bytes")).first()
    listed = (files.groupBy("source", "format").agg(F.sum("units").alias("units"), F.sum("bytes").alias("bytes"))
              .orderBy(F.desc("units"), "source").limit(INPUT_FILES_LISTED).collect())
    return {"input_rows": int(total["units"] or 0),
            "input": {"files": int(total["files"]), "bytes": int(total["bytes"] or 0),
                      "sources": [{"source": r["source"], "format": r["format"], "units": int(r["units"] or 0),
                                   "bytes": int(r["bytes"] or 0)} for r in listed]}}


def _row_numbers(t: dict[str, DataFrame]) -> dict[str, Any]:
    """Counts over a handful of keys: sources, reject reasons, precision, dedup, fates, origins."""
    data: dict[str, Any] = {}
    if "records" in t:
        data["records_by_source"] = _counts_by(t["records"], "source")
    if "rejects" in t:
        data["rejects_by_reason"] = _counts_by(t["rejects"], "reason")
    if "embeddings" in t and "precision" in t["embeddings"].columns:
        data["embed_precision"] = _counts_by(t["embeddings"], "precision")
    if "dedup" in t:
        data["dedup"] = _counts_by(t["dedup"], "status")
    if "lineage" in t:
        data["fates"] = {f: 0 for f in FATES} | _counts_by(t["lineage"], "fate")
        reasons = (t["lineage"].filter(F.col("reason").isNotNull() & (F.col("fate") != "rejected"))
                   .groupBy("fate", "reason").count().collect())
        data["fate_reasons"] = {f"{r['fate']}/{r['reason']}": int(r["count"]) for r in reasons}
    if "final" in t:
        data["final"] = {"original": 0, "merged": 0} | _counts_by(t["final"], "origin")
    return data


def _topic_numbers(t: dict[str, DataFrame], rows: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sizes: dict[int, int] = {}
    if "centroids" in t:
        cent = t["centroids"]
        cols = set(cent.columns)
        aggs = [F.count(F.lit(1)).alias("k"), F.max(F.size("center")).alias("center_dim")]
        if "pca_components" in cols:
            aggs.append(F.max("pca_components").alias("pca_components"))
        if "k" in cols:
            aggs.append(F.max("k").alias("k_setting"))
        row = cent.agg(*aggs).first().asDict()
        out["k"] = int(row.get("k_setting") or row["k"])
        # the centres live in the PCA space, so their length is the component count
        out["pca_components"] = int(row.get("pca_components") or row["center_dim"] or 0)
        if "size" in cols:
            sizes = {int(r["cluster"]): int(r["size"]) for r in cent.select("cluster", "size").collect()}
    if not sizes and "topics" in t:
        sizes = {int(r["cluster"]): int(r["count"]) for r in t["topics"].groupBy("cluster").count().collect()}
        out.setdefault("k", len(sizes))
    if not sizes:
        return out
    kept = ({int(r["cluster"]): int(r["count"]) for r in
             t["dedup"].filter(F.col("status") == "kept").groupBy("cluster").count().collect()}
            if "dedup" in t else {})
    selected = ({int(r["cluster"]): int(r["count"]) for r in t["selected"].groupBy("cluster").count().collect()}
                if "selected" in t else {})
    out["clusters"] = [{"cluster": c, "size": sizes[c], "kept": kept.get(c), "selected": selected.get(c)}
                       for c in sorted(sizes)]
    values = np.array(list(sizes.values()), dtype=float)
    out["cluster_size"] = {"min": int(values.min()), "median": float(np.median(values)),
                           "mean": float(values.mean()), "max": int(values.max())}
    if "embeddings" in rows:
        out["embedded_rows"] = rows["embeddings"]
    return out


def _merge_numbers(t: dict[str, DataFrame]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "merge_groups" in t:
        g = t["merge_groups"].agg(F.count(F.lit(1)).alias("groups"), F.avg("similarity").alias("mean_similarity"),
                                  F.sum(F.size("member_ids")).alias("members")).first()
        out["groups"] = int(g["groups"])
        out["grouped_rows"] = int(g["members"] or 0)
        out["mean_group_similarity"] = None if g["mean_similarity"] is None else _num(round(g["mean_similarity"], 4))
    if "merges" not in t:
        return out
    m = t["merges"]
    out["requests_by_status"] = _counts_by(m, "status")
    agg = m.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct("group_id").alias("groups_attempted"),
        F.sum("attempts").alias("attempts"),
        F.sum("prompt_tokens").alias("prompt_tokens"),
        F.sum("completion_tokens").alias("completion_tokens"),
        F.avg("latency_ms").alias("latency_ms_mean"),
        F.percentile_approx("latency_ms", 0.5).alias("latency_ms_p50"),
        F.percentile_approx("latency_ms", 0.95).alias("latency_ms_p95"),
    ).first().asDict()
    whole = ("rows", "groups_attempted", "attempts", "prompt_tokens", "completion_tokens")
    for key, value in agg.items():
        if key in whole:
            out[key] = int(value or 0)
        else:
            out[key] = None if value is None else _num(round(float(value), 3))
    out["total_tokens"] = (out.get("prompt_tokens") or 0) + (out.get("completion_tokens") or 0)
    out["models"] = _counts_by(m.filter(F.col("model").isNotNull()), "model")
    if "gate" in m.columns:
        from .stages.merge import gate_rejections  # the merge stage owns the gate column's format
        out["gate_rejections"] = gate_rejections(m)
    errors = (m.filter(F.col("error").isNotNull()).groupBy("error").count()
              .orderBy(F.desc("count"), "error").limit(TOP_ERRORS).collect())
    out["top_errors"] = [{"error": r["error"], "count": int(r["count"])} for r in errors]
    return out


# --------------------------------------------------------------------------------------------
# Decontamination
# --------------------------------------------------------------------------------------------

_ITEM = ("eval_set", "file", "item")
_CONTAMINATED_GATE = "struct<failed:array<string>,contaminated:struct<eval_set:string,file:string,item:bigint>>"


def _shorten(text: str | None, chars: int = DECONTAM_TEXT_CHARS) -> str:
    """``text`` cut to ``chars`` characters (an ellipsis marks the cut)."""
    text = " ".join((text or "").split())
    return text if len(text) <= chars else text[:chars].rstrip() + " …"


def _head(column: str, alias: str | None = None) -> Any:
    """The first characters of a text column, cut on Spark so long texts never reach the driver."""
    return F.substring(F.col(column), 1, DECONTAM_TEXT_CHARS + 1).alias(alias or column)


def decontam_numbers(t: dict[str, DataFrame], min_item_words: int) -> dict[str, Any]:
    """Per evaluation set: items, items too short to count, records removed, merges rejected, the
    most matched items and a few contaminated records. ``{"eval_sets": 0, "checked": ...}`` when
    no evaluation item exists: the report must say that the run was not checked."""
    if "eval_items" not in t:
        return {"eval_sets": 0, "checked": "not_run"}
    items = {r["eval_set"]: {"items": int(r["items"]), "ignored_short": int(r["short"] or 0)}
             for r in t["eval_items"].groupBy("eval_set").agg(
                 F.count(F.lit(1)).alias("items"),
                 F.sum(F.when(F.col("words") < min_item_words, 1).otherwise(0)).alias("short")).collect()}
    if not items:
        return {"eval_sets": 0, "checked": "no_eval_items"}
    found = t.get("contamination")
    removed = {} if found is None else {r["eval_set"]: int(r["count"])
                                       for r in found.groupBy("eval_set").count().collect()}
    rejected = contaminated_merges(t["merges"]) if "merges" in t and "gate" in t["merges"].columns else {}
    top = _top_items(found, t["eval_items"]) if found is not None else {}
    examples = _contaminated_examples(found, t["eval_items"], t.get("records")) if found is not None else {}
    sets = [{"eval_set": name, **items.get(name, {"items": 0, "ignored_short": 0}),
             "records_removed": removed.get(name, 0), "merges_rejected": rejected.get(name, 0),
             "top_items": top.get(name, []), "examples": examples.get(name, [])}
            for name in sorted(set(items) | set(removed) | set(rejected))]
    sets.sort(key=lambda s: (-s["records_removed"], s["eval_set"]))
    totals = {key: sum(s[key] for s in sets) for key in ("items", "ignored_short", "records_removed",
                                                          "merges_rejected")}
    return {"eval_sets": len(sets), "checked": "yes", "min_item_words": min_item_words, **totals, "sets": sets}


def contaminated_merges(merges: DataFrame) -> dict[str, int]:
    """``{eval_set: merges rows}`` of the merges the gate rejected as copying evaluation text
    (status gate_failed, ``contaminated`` among the gate's failed checks), counted as
    ``merge.gate_rejections`` counts them. A Spark aggregation: one row per set to the driver."""
    gate = F.from_json("gate", _CONTAMINATED_GATE)
    rows = (merges.where((F.col("status") == "gate_failed")
                         & F.array_contains(gate.getField("failed"), "contaminated"))
            .groupBy(F.coalesce(gate.getField("contaminated").getField("eval_set"), F.lit("(unknown)"))
                     .alias("eval_set")).count().collect())
    return {r["eval_set"]: int(r["count"]) for r in rows}


def _top_items(found: DataFrame, eval_items: DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per set, the ``TOP_MATCHED_ITEMS`` items most records matched (count desc, file, item),
    with the start of their text."""
    order = Window.partitionBy("eval_set").orderBy(F.desc("count"), "file", "item")
    top = (found.groupBy(*_ITEM).count().withColumn("_rank", F.row_number().over(order))
           .where(F.col("_rank") <= TOP_MATCHED_ITEMS)
           .join(eval_items.select(*_ITEM, _head("text")), list(_ITEM), "left").collect())
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(top, key=lambda r: (r["eval_set"], r["_rank"])):
        out.setdefault(r["eval_set"], []).append({"eval_set": r["eval_set"], "file": r["file"], "item": int(r["item"]),
                                                  "records": int(r["count"]), "text": _shorten(r["text"])})
    return out


def _contaminated_examples(found: DataFrame, eval_items: DataFrame,
                           records: DataFrame | None) -> dict[str, list[dict[str, Any]]]:
    """Per set, up to ``DECONTAM_EXAMPLES`` contaminated records, one per item first (so that one
    item matched by many records does not fill the examples), then by id."""
    per_item = Window.partitionBy(*_ITEM).orderBy("id")
    per_set = Window.partitionBy("eval_set").orderBy("_nth", "id")
    picked = (found.withColumn("_nth", F.row_number().over(per_item))
              .withColumn("_rank", F.row_number().over(per_set)).where(F.col("_rank") <= DECONTAM_EXAMPLES)
              .select("id", *_ITEM, "kind", _head("match"), "_rank")
              .join(eval_items.select(*_ITEM, _head("text", "item_text")), list(_ITEM), "left"))
    if records is not None:
        picked = picked.join(records.select("id", _head("instruction")), "id", "left")
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(picked.collect(), key=lambda r: (r["eval_set"], r["_rank"])):
        out.setdefault(r["eval_set"], []).append({
            "id": r["id"], "instruction": _shorten(r["instruction"] if records is not None else None),
            "match": _shorten(r["match"]), "kind": r["kind"], "file": r["file"], "item": int(r["item"]),
            "item_text": _shorten(r["item_text"])})
    return out


def _funnel(data: dict[str, Any], rows: dict[str, int]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if "input_rows" in data:
        steps.append({"step": "input rows", "rows": data["input_rows"]})
    if "records" in rows:
        steps.append({"step": "records (valid, unique)", "rows": rows["records"]})
        if data.get("decontamination", {}).get("eval_sets"):
            # contaminated records leave before embedding: the lineage fate equals this count
            steps.append({"step": DECONTAM_STEP,
                          "rows": rows["records"] - data["decontamination"]["records_removed"]})
    if "dedup" in data:
        steps.append({"step": "kept after dedup", "rows": data["dedup"].get("kept", 0)})
    if "selected" in rows:
        steps.append({"step": "selected", "rows": rows["selected"]})
    if "final" in data:
        steps.append({"step": "final", "rows": data["final"]["original"] + data["final"]["merged"],
                      "original": data["final"]["original"], "merged": data["final"]["merged"],
                      "merged_sources": data.get("fates", {}).get("merged")})
    return steps


# --------------------------------------------------------------------------------------------
# Small samples
# --------------------------------------------------------------------------------------------

def sample_topic_map(store: TableStore, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``sample`` (embedding, cluster) pairs: sampled on Spark, only the sample collected."""
    if not (store.exists("embeddings") and store.exists("topics")):
        return None
    emb = store.read("embeddings")
    total = store.count("embeddings")
    if total == 0:
        return None
    fraction = min(1.0, 1.5 * sample / total)  # oversample a little, then cut to exactly `sample`
    picked = (emb.select("id", "embedding")
              .join(store.read("topics").select("id", "cluster"), "id")
              .sample(withReplacement=False, fraction=fraction, seed=seed)
              .limit(sample).select("cluster", "embedding").toArrow())
    if picked.num_rows < 3:
        return None
    vectors = np.stack([np.asarray(v, dtype=np.float64) for v in picked.column("embedding").to_pylist()])
    clusters = np.asarray(picked.column("cluster").to_pylist(), dtype=np.int64)
    return vectors, clusters


def sample_merge_examples(store: TableStore, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` merges with their sources; accepted merges first, then gate failures."""
    if n <= 0 or not all(store.exists(x) for x in ("merges", "merge_groups", "records")):
        return []
    merges = store.read("merges").filter(F.col("status").isin("merged", "gate_failed")
                                         & F.col("instruction").isNotNull())
    picked = (merges.join(store.read("merge_groups").select("group_id", "member_ids"), "group_id")
              .withColumn("_order", F.when(F.col("status") == "merged", 0).otherwise(1))
              .orderBy("_order", "group_id").limit(n)
              .select("group_id", "status", "instruction", "input", "output", "member_ids").collect())
    if not picked:
        return []
    member_ids = sorted({m for r in picked for m in r["member_ids"]})
    sources = {r["id"]: r.asDict() for r in store.read("records").filter(F.col("id").isin(member_ids))
               .select("id", "instruction", "input", "output").collect()}
    examples = []
    for r in picked:
        examples.append({
            "group_id": r["group_id"], "status": r["status"],
            "merged": {"instruction": r["instruction"], "input": r["input"] or "", "output": r["output"] or ""},
            "sources": [sources.get(m, {"id": m, "instruction": "(missing)", "input": "", "output": ""})
                        for m in r["member_ids"]],
        })
    return examples


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------

def _fmt(n: float | int | None) -> str:
    return "–" if n is None else f"{n:,}"


def plot_funnel(funnel: list[dict[str, Any]], path: Path) -> Path | None:
    """Horizontal bars, input at the top, final at the bottom (originals + merges stacked)."""
    if not funnel:
        return None
    top = max(s["rows"] for s in funnel) or 1
    base = funnel[0]["rows"] or 1
    fig, ax = plt.subplots(figsize=(10, 0.8 * len(funnel) + 1.6), dpi=110)
    labels = []
    for i, step in enumerate(funnel):
        y = len(funnel) - 1 - i
        labels.append((y, step["step"]))
        if step["step"] == "final":
            ax.barh(y, step["original"], color=_COLOURS["original"], label="original rows")
            ax.barh(y, step["merged"], left=step["original"], color=_COLOURS["merged"], label="merged rows")
            note = f"{_fmt(step['original'])} original + {_fmt(step['merged'])} merged"
            if step.get("merged_sources"):
                note += f" (from {_fmt(step['merged_sources'])} sources)"
            ax.legend(loc="lower right", frameon=False, fontsize=9)
        else:
            ax.barh(y, step["rows"], color=_STEP_COLOURS.get(step["step"], _COLOURS["selected"]))
            note = ""
        share = f"{100 * step['rows'] / base:.1f}% of input"
        ax.text(step["rows"] + top * 0.01, y, f"{_fmt(step['rows'])}  ({share})" + (f"\n{note}" if note else ""),
                va="center", fontsize=9, parse_math=False)
    ax.set_yticks([y for y, _ in labels], [name for _, name in labels], fontsize=10)
    ax.set_xlim(0, top * 1.55)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("rows")
    ax.set_title("Stage funnel: rows left after each stage")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_cluster_sizes(clusters: list[dict[str, Any]], budget: int, path: Path) -> Path | None:
    """Left: histogram of cluster sizes. Right: clusters by size with kept and selected rows."""
    if not clusters:
        return None
    sizes = np.array([c["size"] for c in clusters])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110,
                                      gridspec_kw={"width_ratios": [1, 1.4]})
    # integer sizes: bin edges on half-integers so equal sizes make one visible bar, not a sliver
    low, high = int(sizes.min()), int(sizes.max())
    step = max(1, math.ceil((high - low + 1) / 30))
    edges = np.arange(low - 0.5, high + step + 0.5, step)
    left.hist(sizes, bins=edges, color=_COLOURS["records"], edgecolor="white")
    left.axvline(budget, color=_COLOURS["selected"], linestyle="--", label=f"select budget ({budget})")
    left.set_xlabel("rows in cluster")
    left.set_ylabel("clusters")
    left.set_title(f"Cluster sizes (k = {len(sizes)})")
    left.yaxis.get_major_locator().set_params(integer=True)
    left.legend(frameon=False, fontsize=9, loc="best")

    order = sorted(clusters, key=lambda c: -c["size"])
    x = np.arange(len(order))
    right.bar(x, [c["size"] for c in order], color=_COLOURS["input"], label="clustered", width=0.9)
    if any(c.get("kept") is not None for c in order):
        right.bar(x, [c.get("kept") or 0 for c in order], color=_COLOURS["dedup"], label="kept after dedup",
                  width=0.6)
    if any(c.get("selected") is not None for c in order):
        right.bar(x, [c.get("selected") or 0 for c in order], color=_COLOURS["selected"], label="selected",
                  width=0.3)
    right.set_xlabel("clusters, largest first")
    right.set_ylabel("rows")
    right.set_title("Rows per cluster through dedup and selection")
    if len(order) <= 30:
        right.set_xticks(x, [str(c["cluster"]) for c in order], fontsize=8)
    right.set_ylim(0, sizes.max() * 1.22)  # headroom so the legend never covers a bar
    right.legend(frameon=False, fontsize=9, ncol=3, loc="upper center")
    for a in (left, right):
        a.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def project_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the sample to two dimensions: (points, explained variance ratio of the two axes)."""
    centred = vectors - vectors.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    ratio = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return centred @ vt[:2].T, ratio


def _cluster_colour(i: int, n: int) -> tuple:
    """Distinct colours: tab10 up to 10 clusters, tab20 with its dark shades first up to 20
    (tab20 pairs a dark and a light shade of one hue; neighbours would look alike), then turbo."""
    if n <= 10:
        return plt.get_cmap("tab10")(i)
    if n <= 20:
        return plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20)
    return plt.get_cmap("turbo")(i / (n - 1))


def plot_topic_map(sample: tuple[np.ndarray, np.ndarray] | None, path: Path) -> Path | None:
    """The sampled embeddings on their first two principal axes, coloured by cluster."""
    if sample is None:
        return None
    vectors, clusters = sample
    points, ratio = project_2d(vectors)
    labels = np.unique(clusters)
    colour_of = {c: _cluster_colour(i, len(labels)) for i, c in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=110)
    size = 14 if len(points) <= 2000 else 5
    for c in labels:
        mask = clusters == c
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=colour_of[c], alpha=0.75,
                   label=f"cluster {c}", linewidths=0)
    # name the biggest clusters at their centre so the map reads without the legend
    counts = sorted(((int((clusters == c).sum()), c) for c in labels), reverse=True)[:20]
    for _, c in counts:
        cx, cy = points[clusters == c].mean(axis=0)
        ax.text(cx, cy, str(c), fontsize=9, weight="bold", ha="center", va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colour_of[c], "alpha": 0.85})
    if len(labels) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8, markerscale=1.5)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of sample variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of sample variance)")
    ax.set_title(f"Topic map: {len(points):,} sampled instructions, {len(labels)} clusters")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _example_text(fields: dict[str, Any], width: int) -> list[str]:
    lines: list[str] = []
    for key in ("instruction", "input", "output"):
        value = (fields.get(key) or "").strip()
        if key == "input" and not value:
            continue
        if len(value) > EXAMPLE_FIELD_CHARS:
            value = value[:EXAMPLE_FIELD_CHARS].rstrip() + " …"
        wrapped: list[str] = []
        for para in value.splitlines() or [""]:
            wrapped += textwrap.wrap(para, width) or [""]
        if len(wrapped) > 12:
            wrapped = wrapped[:12] + ["…"]
        lines.append(f"{key.upper()}:")
        lines += ["  " + w for w in wrapped]
    return lines


def plot_merge_examples(examples: list[dict[str, Any]], path: Path) -> Path | None:
    """Each example one band: its sources stacked on the left, the merged example on the right."""
    if not examples:
        return None
    width = 70
    bands = []
    for ex in examples:
        left: list[str] = []
        for i, src in enumerate(ex["sources"], 1):
            left += ([""] if left else []) + [f"— source {i} ({src.get('id', '')[:10]})"] + _example_text(src, width)
        right = [f"— merged ({ex['status']}, group {ex['group_id'][:10]})"] + _example_text(ex["merged"], width)
        bands.append((left, right, ex["status"]))
    font_pt, spacing = 8.2, 1.25
    line_h = font_pt * spacing / 72 * 1.03  # inches per text line (points / 72), a little slack
    heights = [max(len(l), len(r)) * line_h + 0.35 for l, r, _ in bands]
    fig = plt.figure(figsize=(15, sum(heights) + 0.7), dpi=100)
    total = sum(heights) + 0.7
    fig.text(0.25, 1 - 0.25 / total, "Sources", ha="center", va="center", fontsize=13, weight="bold")
    fig.text(0.75, 1 - 0.25 / total, "Merged", ha="center", va="center", fontsize=13, weight="bold")
    y = total - 0.55
    for (left, right, status), h in zip(bands, heights):
        top = y / total
        for x, lines, colour in ((0.01, left, "#eef2f7"),
                                 (0.51, right, "#eaf6ee" if status == "merged" else "#fbeeee")):
            fig.patches.append(matplotlib.patches.Rectangle(
                (x, (y - h + 0.1) / total), 0.48, (h - 0.15) / total, transform=fig.transFigure,
                facecolor=colour, edgecolor="#c8ced6"))
            fig.text(x + 0.008, top - 0.08 / total, "\n".join(lines), ha="left", va="top", fontsize=font_pt,
                     family="DejaVu Sans Mono", parse_math=False, linespacing=spacing)
        y -= h
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1f2933}
main{max-width:1280px;margin:0 auto;padding:24px}
.banner{padding:12px 16px;border-radius:6px;margin:0 0 16px;border:1px solid}
.banner.failed{background:#fdecea;border-color:#e0a39b;color:#7a1c12}
.banner.warning{background:#fff6e0;border-color:#e6c77a;color:#6b4a00}
h1{margin:0 0 4px}h2{margin-top:36px;border-bottom:2px solid #d9dee4;padding-bottom:4px}
.muted{color:#66717d;font-size:14px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #d9dee4;border-radius:8px;padding:10px 16px;min-width:130px}
.card b{display:block;font-size:24px}.card span{color:#66717d;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-size:14px}
th,td{border:1px solid #d9dee4;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;background:#fff;border:1px solid #d9dee4;border-radius:6px;margin:8px 0}
.ok{color:#1d7a46;font-weight:bold}.bad{color:#b42318;font-weight:bold}
table.examples{table-layout:fixed;width:100%}table.examples td{width:50%;font-size:13px}
.ex-field{white-space:pre-wrap;margin:2px 0 8px}.ex-src{border-bottom:1px dashed #c8ced6;margin-bottom:6px}
pre{background:#fff;border:1px solid #d9dee4;padding:10px;overflow:auto;font-size:12px}
"""


class _NumberText(str):
    """A figure already formatted (a cost at four decimals, a ratio): ``_table`` aligns it as a number."""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="n">{html.escape(_fmt(round(v, 2) if isinstance(v, float) else v))}</td>')
            elif isinstance(v, _NumberText):
                cells.append(f'<td class="n">{html.escape(v)}</td>')
            else:
                cells.append(f"<td>{html.escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(pictures: dict[str, Path], name: str, alt: str) -> str:
    path = pictures.get(name)
    if path is None:
        return f'<p class="muted">No {html.escape(alt)}: the tables it needs are missing or empty.</p>'
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _examples_html(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return '<p class="muted">No merge examples (no merges in this run).</p>'

    def fields(d: dict[str, Any]) -> str:
        out = []
        for key in ("instruction", "input", "output"):
            value = d.get(key) or ""
            if key == "input" and not value:
                continue
            out.append(f'<div><b>{key}</b><div class="ex-field">{html.escape(value)}</div></div>')
        return "".join(out)

    rows = []
    for ex in examples:
        sources = "".join(f'<div class="ex-src"><span class="muted">source {html.escape(s.get("id", ""))}</span>'
                          f"{fields(s)}</div>" for s in ex["sources"])
        status = "ok" if ex["status"] == "merged" else "bad"
        merged = (f'<span class="muted">group {html.escape(ex["group_id"])} · </span>'
                  f'<span class="{status}">{html.escape(ex["status"])}</span>{fields(ex["merged"])}')
        rows.append(f"<tr><td>{sources}</td><td>{merged}</td></tr>")
    return f'<table class="examples"><tr><th>Sources</th><th>Merged</th></tr>{"".join(rows)}</table>'


def _cards_html(data: dict[str, Any]) -> str:
    funnel = {s["step"]: s["rows"] for s in data.get("funnel", [])}
    tables = data.get("tables", {})
    cards = [("input rows", data.get("input_rows")), ("records", tables.get("records", {}).get("rows")),
             ("rejects", tables.get("rejects", {}).get("rows")),
             ("contaminated", data.get("decontamination", {}).get("records_removed")),
             ("kept after dedup", funnel.get("kept after dedup")), ("selected", funnel.get("selected")),
             ("final", funnel.get("final")), ("merged rows in final", data.get("final", {}).get("merged"))]
    if data.get("input_rows") and funnel.get("final") is not None:
        cards.append(("final / input", f"{100 * funnel['final'] / data['input_rows']:.1f}%"))
    return "".join(f'<div class="card"><b>{html.escape(v if isinstance(v, str) else _fmt(v))}</b>'
                   f"<span>{html.escape(k)}</span></div>" for k, v in cards if v is not None)


def _ledger_html(ledger: dict[str, Any] | None) -> str:
    if ledger is None:
        return '<span class="muted">ledger not checked (finalize has not run)</span>'
    if ledger["balanced"]:
        return (f'<span class="ok">ledger balances</span>: {_fmt(ledger["input_rows"])} input rows '
                f'(counted by ingest in {_fmt(ledger["input_files"])} input files) = '
                f'{_fmt(ledger["records"])} records + {_fmt(ledger["rejects"])} rejects = '
                f'{_fmt(ledger["lineage_rows"])} lineage rows; every record id appears once')
    return ('<span class="bad">ledger does NOT balance</span><ul>'
            + "".join(f"<li>{html.escape(p)}</li>" for p in ledger["problems"]) + "</ul>")


def _rows_html(data: dict[str, Any]) -> list[str]:
    """The input, the funnel's table, fates, rejects: where every input row went."""
    parts = []
    if data.get("input"):
        parts.append("<h2>Input</h2>")
        parts.append(_table(["source", "format", "units (counted before parsing)", "bytes"],
                            [[s["source"], s["format"], s["units"], s["bytes"]] for s in data["input"]["sources"]]))
    if "fates" in data:
        total = sum(data["fates"].values()) or 1
        parts.append("<h2>Fate of every input row</h2>")
        parts.append(_table(["fate", "rows", "share"],
                            [[f, n, f"{100 * n / total:.1f}%"] for f, n in data["fates"].items()]))
        if data.get("fate_reasons"):
            parts.append(_table(["fate / reason", "rows"], [[k, v] for k, v in data["fate_reasons"].items()]))
    if data.get("rejects_by_reason") is not None:
        parts.append("<h2>Rejects by reason</h2>")
        parts.append(_table(["reason", "rows"], [[k, v] for k, v in data["rejects_by_reason"].items()])
                     if data["rejects_by_reason"] else '<p class="muted">No rejects.</p>')
    return parts


def _item_label(eval_set: str, file: str, item: int) -> str:
    """An evaluation item as a reader finds it under its set's heading: its 0-based row, after
    its file (relative to the set's folder) unless the set is that one file."""
    if file == eval_set:
        return f"row {item}"
    name = file[len(eval_set):].lstrip("/") if file.startswith(eval_set) else Path(file).name
    return f"{name} · row {item}"


def _decontam_html(dec: dict[str, Any] | None) -> list[str]:
    """The Decontamination section: one line when the run was not checked for contamination,
    else per evaluation set its numbers, its most matched items and a few removed records."""
    if not dec:
        return []
    parts = ["<h2>Decontamination</h2>"]
    if not dec.get("eval_sets"):
        why = ("the decontam stage has not run" if dec.get("checked") == "not_run"
               else "no evaluation set was configured (decontam.eval_paths is empty or its files hold no item)")
        return parts + [f'<p><span class="bad">This run was NOT checked for contamination</span>: '
                        f"{html.escape(why)}.</p>"]
    words = dec["min_item_words"]
    parts.append(f"<p>{_fmt(dec['eval_sets'])} evaluation set(s), {_fmt(dec['items'])} items "
                 f"({_fmt(dec['ignored_short'])} under {words} words ignored): "
                 f"<b>{_fmt(dec['records_removed'])} records removed</b>, "
                 f"{_fmt(dec['merges_rejected'])} merges rejected by the gate.</p>")
    for s in dec["sets"]:
        parts.append(f"<h3>{html.escape(s['eval_set'])}</h3>")
        parts.append(_table(["items", f"ignored (under {words} words)", "records removed", "merges rejected"],
                            [[s["items"], s["ignored_short"], s["records_removed"], s["merges_rejected"]]]))
        if s["top_items"]:
            parts.append(_table(["most matched item", "records", "item text"],
                                [[_item_label(s["eval_set"], i["file"], i["item"]), i["records"], i["text"]]
                                 for i in s["top_items"]]))
        if s["examples"]:
            parts.append(_table(["removed record", "its instruction", "matched words", "item"],
                                [[e["id"], e["instruction"], e["match"],
                                  f"{_item_label(s['eval_set'], e['file'], e['item'])}: {e['item_text']}"]
                                 for e in s["examples"]]))
    return parts


def _topics_html(data: dict[str, Any], pictures: dict[str, Path]) -> list[str]:
    topics = data.get("topics", {})
    parts = []
    if data.get("embed_precision"):
        parts.append("<h2>Embeddings</h2>")
        parts.append(_table(["precision", "rows"], [[k, v] for k, v in data["embed_precision"].items()]))
    if topics:
        parts.append("<h2>Topics</h2>")
        size = topics.get("cluster_size", {})
        parts.append(_table(["k (clusters)", "PCA components", "smallest", "median", "largest"],
                            [[topics.get("k"), topics.get("pca_components"), size.get("min"),
                              size.get("median"), size.get("max")]]))
        parts.append(_img(pictures, "cluster_sizes", "cluster sizes"))
        parts.append(_img(pictures, "topic_map", "topic map"))
    return parts


def _spend_numbers(store: TableStore, settings: Settings, merging: dict[str, Any]) -> dict[str, Any]:
    """With prices stated (``llm.price_*``): what the merges rows' tokens cost, and what the
    ledger records as spent on this run root over every run (failed requests, retries and the
    preflight included), the figure ``merge.max_cost`` is held to."""
    from .llm.spend import Prices
    from .stages.merge import LEDGER_NAME, ledger_spend
    prices = Prices.from_settings(settings.llm)
    if not (prices.input_per_million or prices.output_per_million) or "rows" not in merging:
        return {}
    spent = ledger_spend(store.spark, store.ledger_path(LEDGER_NAME), prices)
    return {"cost": _num(round(prices.cost(merging["prompt_tokens"], merging["completion_tokens"]), 6)),
            "ledger_spent": {"requests": spent.requests, "tokens": spent.tokens, "cost": _num(round(spent.cost, 6))},
            "max_cost": settings.merge.max_cost or None}


PLAN_FIGURES = (("requests", "requests"), ("prompt_tokens", "prompt tokens"),
                ("completion_tokens", "completion tokens"), ("cost", "cost"), ("seconds", "wall time (s)"))


def plan_against_actual(store: TableStore) -> dict[str, Any] | None:
    """The recorded plan (``plan.record_plan``) against what the merge passes logged after it sent
    (``stages.merge.merge_runs``, summed), or None when no plan is recorded. With several plans,
    the latest that a merge pass followed, else the latest (its ``actual`` None). A plan's figures
    are for the groups left after its sample, so the sample's spend is kept apart (``sample``),
    and so is the passes' preflight (``actual_preflight``), which no plan counts."""
    from .plan import recorded_plans
    from .stages.merge import merge_runs
    plans, runs = recorded_plans(store), merge_runs(store)
    if not plans:
        return None

    def after(entry: dict[str, Any]) -> list[dict[str, Any]]:
        return runs[int(entry.get("merge_runs_before") or 0):]

    entry = next((p for p in reversed(plans) if after(p)), plans[-1])
    sent, plan = after(entry), entry["plan"]
    return {"made_at": entry.get("made_at") or entry.get("written_at"), "model": plan.get("model"),
            "plans_recorded": len(plans), "runs_after": len(sent), "covered": entry.get("covered") or {},
            "sample": entry.get("sample") or {},
            "actual_preflight": {"requests": _total(sent, "preflight_requests"),
                                 "tokens": _total(sent, "preflight_tokens")} if sent else None,
            "figures": {key: _versus(plan.get(key) or {}, _total(sent, key) if sent else None)
                        for key, _ in PLAN_FIGURES}}


def _total(runs: list[dict[str, Any]], key: str) -> int | float:
    """``key`` summed over merge run summaries: whole for counts, rounded for cost and seconds."""
    total = sum(r.get(key) or 0 for r in runs)
    return round(total, 6) if isinstance(total, float) else int(total)


def _versus(figure: dict[str, Any], actual: float | None) -> dict[str, Any]:
    """One planned figure (value, source, note) beside its actual value and actual / planned."""
    planned = figure.get("value")
    ratio = actual / planned if actual is not None and planned else None
    return {"planned": _num(planned), "source": figure.get("source"), "note": figure.get("note", ""),
            "actual": _num(actual), "ratio": None if ratio is None else _num(round(ratio, 4))}


def _money(value: float | None) -> str:
    """An amount at four decimals: LLM calls cost fractions of a cent each."""
    return "" if value is None else f"{value:.4f}"


def _merging_html(merging: dict[str, Any]) -> list[str]:
    if not merging:
        return []
    parts = ["<h2>Merging</h2>",
             _table(["groups", "grouped rows", "mean group similarity", "requests", "prompt tokens",
                     "completion tokens", "latency p50 ms", "latency p95 ms"],
                    [[merging.get("groups"), merging.get("grouped_rows"), merging.get("mean_group_similarity"),
                      merging.get("rows"), merging.get("prompt_tokens"), merging.get("completion_tokens"),
                      merging.get("latency_ms_p50"), merging.get("latency_ms_p95")]])]
    if "ledger_spent" in merging:
        spent = merging["ledger_spent"]
        parts.append(_table(["cost of the merges rows", "spent on this root (ledger: every run, retries, "
                             "preflight)", "requests", "tokens", "cap (merge.max_cost)"],
                            [[_money(merging.get("cost")), _money(spent["cost"]), spent["requests"], spent["tokens"],
                              _money(merging.get("max_cost")) if merging.get("max_cost") else "none"]]))
    listings = (("requests_by_status", "merge status"), ("gate_rejections", "gate check failed"),
                ("models", "model"))
    for key, header in listings:
        if merging.get(key):
            parts.append(_table([header, "rows"], [[k, v] for k, v in merging[key].items()]))
    if merging.get("top_errors"):
        parts.append(_table(["most frequent errors", "rows"], [[e["error"], e["count"]] for e in merging["top_errors"]]))
    if merging.get("plan_vs_actual"):
        parts += _plan_html(merging["plan_vs_actual"])
    return parts


def _plan_cell(key: str, value: float | None) -> _NumberText:
    """A planned or actual figure as the plan prints it, right-aligned: cost at four decimals, wall
    time at one, counts whole (a plan's requests per group are a mean, so its counts have fractions)."""
    if value is None:
        return _NumberText("–")
    if key == "cost":
        return _NumberText(_money(value))
    return _NumberText(f"{value:,.1f}" if key == "seconds" else f"{value:,.0f}")


def _plan_html(against: dict[str, Any]) -> list[str]:
    """"Plan against actual": what ``mergeit plan`` said the merge stage would send, beside what
    the merge passes after it sent, and what the plan's own sample paid, apart."""
    covered, sample, runs = against["covered"], against["sample"], against["runs_after"]
    intro = (f"Plan made {against['made_at']} for model {against['model']}: {_fmt(covered.get('groups'))} "
             f"groups, {_fmt(covered.get('answered'))} already paid, {_fmt(covered.get('to_send'))} to send. ")
    intro += (f"Actual: what {_count(runs, 'merge run')} finished after it sent" + (", summed." if runs > 1 else ".")
              if runs else "No merge run has finished since this plan: nothing to compare yet.")
    sampled = bool(sample.get("groups") or sample.get("requests"))
    headers = ["figure", "planned", "actual", "actual / planned", "planned from"]
    headers += ["paid by the plan's --sample (apart)"] if sampled else []
    rows = []
    for key, label in PLAN_FIGURES:
        fig = against["figures"][key]
        how = fig["source"] + (f": {fig['note']}" if fig.get("note") else "")
        ratio = _NumberText("–" if fig["ratio"] is None else f"{fig['ratio']:.2f}")
        row = [label, _plan_cell(key, fig["planned"]), _plan_cell(key, fig["actual"]), ratio, how]
        rows.append(row + ([_plan_cell(key, sample.get(key))] if sampled else []))
    return (["<h3>Plan against actual</h3>", f"<p>{html.escape(intro)}</p>", _table(headers, rows)]
            + [f'<p class="muted">{html.escape(note)}</p>' for note in _plan_notes(against, sampled)])


def _plan_notes(against: dict[str, Any], sampled: bool) -> list[str]:
    """What a reader of the plan table must know: the sample is apart, the preflight is in the
    actual cost only, the actual wall time is the whole pass, which of several plans this is."""
    notes = []
    if sampled:
        sample = against["sample"]
        notes.append(f"The plan's --sample merged {_count(sample.get('groups') or 0, 'group')} before it was "
                     f"made (and sent {_count(sample.get('preflight_requests') or 0, 'preflight request')}); "
                     "the plan counts only the groups left after them, so their spend is shown apart.")
    if against.get("actual_preflight"):
        pre = against["actual_preflight"]
        notes.append(f"Actual requests and tokens leave out the runs' preflight "
                     f"({_count(pre['requests'], 'request')}, {_count(pre['tokens'], 'token')}); the actual cost "
                     "includes it. The actual wall time is the merge passes' whole time (Spark jobs, gate, ledger "
                     "compaction); the plan's is the requests' alone.")
    if against.get("plans_recorded", 1) > 1:
        which = "the latest one a merge run followed" if against["runs_after"] else "the latest"
        notes.append(f"{against['plans_recorded']} plans are recorded on this run root; this is {which}.")
    return notes


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: "1 merge run", "2 merge runs"."""
    return f"{_fmt(n)} {noun}{'' if n == 1 else 's'}"


def _details(summary: str, value: Any) -> str:
    return (f"<details><summary>{html.escape(summary)}</summary><pre>"
            + html.escape(json.dumps(value, indent=2, default=str)) + "</pre></details>")


def _shortfalls_html(shortfalls: dict[str, dict[str, Any]]) -> str:
    """The banner at the top: stages whose work is partly undone (a rerun retries it)."""
    notes = []
    for stage, short in shortfalls.items():
        level = "failed" if short.get("beyond_tolerance") else "warning"
        notes.append(f"<div class='banner {level}' role='alert'><strong>{html.escape(stage)}: "
                     f"{'too many groups failed' if level == 'failed' else 'groups left to retry'}</strong> "
                     f"{html.escape(str(short.get('message', '')))}</div>")
    return "".join(notes)


def render_html(data: dict[str, Any], pictures: dict[str, Path], examples: list[dict[str, Any]]) -> str:
    """One self-contained page: inline CSS, PNGs as data URIs, no external assets."""
    parts = [_shortfalls_html(data.get("extra", {}).get("shortfalls") or {}),
             f"<h1>MergeIT run report</h1><div class='muted'>run root {html.escape(data['run_root'])} · "
             f"generated {html.escape(data['generated_at'])}</div><p>{_ledger_html(data.get('ledger'))}</p>"
             f"<div class='cards'>{_cards_html(data)}</div>"]
    parts.append("<h2>Stage funnel</h2>" + _img(pictures, "funnel", "stage funnel"))
    if data.get("funnel"):
        parts.append(_table(["step", "rows"], [[s["step"], s["rows"]] for s in data["funnel"]]))
    parts += _rows_html(data)
    parts += _decontam_html(data.get("decontamination"))
    parts += _topics_html(data, pictures)
    parts += _merging_html(data.get("merging", {}))
    parts.append("<h2>Merge examples</h2>" + _examples_html(examples))
    if "merge_examples" in pictures:
        parts.append("<details><summary>The same examples as a picture (merge_examples.png)</summary>"
                     + _img(pictures, "merge_examples", "merge examples") + "</details>")
    if data.get("timings"):
        parts.append("<h2>Timings</h2>")
        parts.append(_table(["stage", "seconds"], [[k, v] for k, v in data["timings"].items()]))
    parts.append("<h2>Tables</h2>")
    parts.append(_table(["table", "rows", "Delta version"],
                        [[k, v["rows"], v["version"]] for k, v in data.get("tables", {}).items()]))
    if data.get("extra"):
        parts.append(_details("Extra", data["extra"]))
    parts.append(_details("Settings", data.get("settings", {})))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>MergeIT run report</title>"
            f"<style>{_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def build_report(store: TableStore, out_dir: Path, settings: Settings, timings: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write report.json, the PNGs and report.html into ``out_dir``; return the HTML's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect_report_data(store, settings, timings, extra)
    examples = sample_merge_examples(store, settings.report.examples)
    sample = sample_topic_map(store, settings.report.topic_map_sample, settings.topics.seed)
    data["topics"]["topic_map_sample"] = 0 if sample is None else int(len(sample[1]))
    data["merge_examples"] = examples

    made = {
        "funnel": plot_funnel(data.get("funnel", []), out_dir / "funnel.png"),
        "cluster_sizes": plot_cluster_sizes(data["topics"].get("clusters", []), settings.select.budget,
                                            out_dir / "cluster_sizes.png"),
        "topic_map": plot_topic_map(sample, out_dir / "topic_map.png"),
        "merge_examples": plot_merge_examples(examples, out_dir / "merge_examples.png"),
    }
    pictures = {name: path for name, path in made.items() if path is not None}
    for name in set(PICTURES) - set(pictures):  # a picture from an earlier report would mislead
        (out_dir / f"{name}.png").unlink(missing_ok=True)
    data["pictures"] = {name: path.name for name, path in pictures.items()}

    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    page = out_dir / "report.html"
    page.write_text(render_html(data, pictures, examples), encoding="utf-8")
    return page


def write_report(pipeline: "Pipeline") -> str:
    """The report of ``pipeline``'s run root under ``<root>/report`` (built in a local folder and
    copied there when the root is not local), with the stages' timings, summaries, checks and
    shortfalls from their state; where its page is."""
    root = pipeline.root
    if root.local is not None:
        return str(_pipeline_report(pipeline, Path(root.local) / "report"))
    with tempfile.TemporaryDirectory(prefix="mergeit-report-") as folder:
        page = _pipeline_report(pipeline, Path(folder))
        (root / "report").upload(folder)
    return (root / "report" / page.name).uri


def _pipeline_report(pipeline: "Pipeline", out_dir: Path) -> Path:
    states = {name: pipeline.state(name) or {} for name in pipeline.stage_names()}
    extra = {"shortfalls": {k: s["shortfall"] for k, s in states.items() if s.get("shortfall")},
             "stage_summaries": {k: s.get("summary", {}) for k, s in states.items()},
             "stage_checks": {k: s["checks"] for k, s in states.items() if s.get("checks")}}
    return build_report(pipeline.store, out_dir, pipeline.settings, timings=pipeline.timings(), extra=extra)
