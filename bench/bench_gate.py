"""The merge gate on its labelled set (tests/data/gate_cases.json): thresholds chosen on the tune
split, accepted/rejected per split and per kind, and the numbers behind the output check's design.

No Spark: the gate's own ``judge`` with the embed stage's ``encode_texts`` (what the stage runs).
Writes the "merge-gate" section of BENCHMARKS.md. Usage: .venv/bin/python bench/bench_gate.py
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench._common import write_section  # noqa: E402
from mergeit_spark.config import GateSettings, load_settings  # noqa: E402
from mergeit_spark.models import encode_texts  # noqa: E402

from _gate_cases import BAD_KINDS, GOOD_KINDS, choose_thresholds, judge_cases, load_cases  # noqa: E402

DATA = (REPO / ".." / "shared" / "data").resolve()


def output_embedding_margin(cases, embed) -> dict[str, tuple[float, float]]:
    """The alternative output check: cosine of the merged output to each source output, minus
    the two source outputs' own cosine (min over sources). Lowest good vs highest drop_answer."""
    texts = sorted({s["output"] for c in cases for s in c.sources} | {c.merged["output"] for c in cases})
    vec = dict(zip(texts, encode_texts(texts, embed)))
    out = {}
    for split in ("tune", "check"):
        values = {}
        for c in (c for c in cases if c.split == split and c.kind in ("good", "drop_answer")):
            a, b = (vec[s["output"]] for s in c.sources)
            m = vec[c.merged["output"]]
            values.setdefault(c.kind, []).append(min(m @ a, m @ b) - a @ b)
        out[split] = (min(values["good"]), max(values["drop_answer"]))
    return out


def old_gate_passes(merged: dict, sources: list[dict], m: np.ndarray, vectors: np.ndarray) -> bool:
    """The gate before issue 11 (git HEAD): instruction similarity >= 0.5 to every source, output at
    least half the longest source output, not a copy (cosine >= 0.98 and output <= 1.1x)."""
    sims = vectors @ m
    out = len(merged["output"])
    lengths = [len(s["output"]) for s in sources]
    copy = any(sim >= 0.98 and out <= 1.1 * n for sim, n in zip(sims, lengths))
    return bool(sims.min() >= 0.5 and out >= 0.5 * max(lengths) and not copy)


def at_scale(n_groups: int, settings) -> list[str]:
    """The issue's measurement on real groups: a server that asks for both sources but answers
    the first only, one that returns the first source alone (reworded a little, so that it is no
    verbatim copy), and honest merges; the gate before this change and now, side by side."""
    import json

    from bench.bench_merge import CHUNK, cached_embeddings, load_rows
    from fake_openai import merged_content
    from mergeit_spark.llm.gate import GroupSources, embedding_text, judge
    from mergeit_spark.stages.group import group_cluster

    rows = load_rows(n_groups * 5)
    vectors = cached_embeddings(rows, settings.embed)
    groups = []
    for start in range(0, len(rows), CHUNK):
        ids = [r["id"] for r in rows[start:start + CHUNK]]
        groups += [[start + ids.index(m) for m in members]
                   for members, _ in group_cluster(ids, vectors[start:start + CHUNK], 0.55, 2)]
    groups = groups[:n_groups]
    kinds = {
        "honest merge (both joined)": lambda a, b: json.loads(merged_content([a, b])),
        "asks for both, answers the first": lambda a, b: dict(
            json.loads(merged_content([a, b])), output=a["output"]),
        "the first source alone, lightly reworded": lambda a, b: {
            "instruction": "Please answer the following. " + a["instruction"], "input": a["input"],
            "output": a["output"] + "\n\nThis answers the request in full."},
    }
    lines = [f"At scale: {len(groups)} real groups (mergeit-6k.json, grouped as the benchmark groups "
             f"them), each answered three ways; share accepted by the gate before this change (git "
             f"HEAD: similarity, length, copy) and now:", "",
             "| merge | accepted before | accepted now |", "| --- | --- | --- |"]
    for label, make in kinds.items():
        merged = [make(rows[i], rows[j]) for i, j in groups]
        mv = encode_texts([embedding_text(m["instruction"], m["input"]) for m in merged], settings.embed)
        pairs = [[rows[i], rows[j]] for i, j in groups]
        vecs = [np.stack([vectors[i], vectors[j]]) for i, j in groups]
        now = judge(merged, [GroupSources(p, v) for p, v in zip(pairs, vecs)], mv, settings.gate)
        before = [old_gate_passes(m, p, mv[k] / np.linalg.norm(mv[k]), v)
                  for k, (m, p, v) in enumerate(zip(merged, pairs, vecs))]
        lines.append(f"| {label} | {sum(before) / len(merged):.1%} | {sum(v.passed for v in now) / len(merged):.1%} |")
    return lines


def main() -> None:
    settings = load_settings(env={})
    cases = load_cases(DATA)
    verdicts = judge_cases(cases, settings.gate, settings.embed)
    tune = [(c, v) for c, v in zip(cases, verdicts) if c.split == "tune"]
    chosen = choose_thresholds(tuple(c for c, _ in tune), [v for _, v in tune])
    lines = [f"{len(cases)} cases over {len({c.group for c in cases})} groups of 2 real records "
             f"(mergeit-6k.json, cited by id): per group {len(GOOD_KINDS)} good merges "
             f"({', '.join(GOOD_KINDS)}) and {len(BAD_KINDS)} bad ones ({', '.join(BAD_KINDS)}); "
             f"odd groups are the tune split, even groups the check split.", "",
             "Thresholds chosen on the tune split (`tests/_gate_cases.choose_thresholds`) and the "
             "defaults in `GateSettings`:", "",
             "| threshold | chosen on tune | default |", "| --- | --- | --- |"]
    defaults = GateSettings()
    lines += [f"| gate.{k} | {v:.4f} | {getattr(defaults, k)} |" for k, v in chosen.items()]
    lines += ["", "| split | good accepted | bad rejected | " + " | ".join(
        f"{k} rejected" for k in BAD_KINDS) + " |", "| --- | --- | --- |" + " --- |" * len(BAD_KINDS)]
    for split in ("tune", "check"):
        judged = [(c, v) for c, v in zip(cases, verdicts) if c.split == split]
        good = [v.passed for c, v in judged if c.good]
        bad = [not v.passed for c, v in judged if not c.good]
        per_kind = [sum(not v.passed for c, v in judged if c.kind == k) for k in BAD_KINDS]
        total = Counter(c.kind for c, _ in judged)
        lines.append(f"| {split} | {sum(good)}/{len(good)} | {sum(bad)}/{len(bad)} | " + " | ".join(
            f"{n}/{total[k]}" for n, k in zip(per_kind, BAD_KINDS)) + " |")
    # Round 1 used the midpoint rule for the output check too; the check split showed what it let by.
    midpoint = choose_thresholds(tuple(c for c, _ in tune), [v for _, v in tune], good_share=1.0)
    t = midpoint["min_output_coverage"]
    passes = lambda v: not (set(v.failed) - {"output_coverage"}) and v.output_coverage >= t  # noqa: E731
    missed = [c.name for c, v in zip(cases, verdicts) if not c.good and passes(v)]
    kept = sum(passes(v) for c, v in zip(cases, verdicts) if c.good)
    lines += ["", f"First round, with the output threshold at the midpoint rule too "
              f"(gate.min_output_coverage = {t:.4f}): good accepted {kept}/{sum(c.good for c in cases)}, "
              f"bad let through: {', '.join(missed) or 'none'}. A merge that drops an answer deletes "
              f"that source's content, a refused merge only keeps both originals, so the output "
              f"threshold now sits as high as keeps 90 % of the tune split's good merges. That rule was "
              f"chosen after the check split had been seen once."]
    refused = [c.name for c, v in zip(cases, verdicts) if c.good and not v.passed]
    checks = Counter(f for c, v in zip(cases, verdicts) if not c.good for f in v.failed)
    margins = output_embedding_margin(cases, settings.embed)
    lines += ["", f"Good merges refused: {', '.join(refused) or 'none'}. Checks failed by the bad "
              f"cases (a case can fail several): " + ", ".join(f"{k} {n}" for k, n in checks.most_common()) + ".",
              "", "Why the output check is lexical: an embedding version (cosine of the merged output to "
              "each source output minus the two outputs' own cosine) does not separate good merges from "
              "merges that answer one source: lowest good vs highest drop_answer = " + "; ".join(
                  f"{s} {g:+.3f} vs {b:+.3f}" for s, (g, b) in margins.items())
              + ", while the lexical output coverage separates them on both splits; and embedding "
              "outputs costs several times the instruction text per merge on a CPU."]
    lines += [""] + at_scale(300, settings)
    print("\n".join(lines))
    write_section("merge-gate", "\n".join(lines))


if __name__ == "__main__":
    main()
