"""Decontamination against a large evaluation set, timed beside the embed step of the same run.

All of ../shared/data goes through ``mergeit run --until embed`` (ingest → decontam → embed) with
an evaluation set of ``--items`` items (100,000 by default). No public benchmark of that size is
offline here, so the items are made from the shared data's own text, in the proportions of a
benchmark that leaked a little: ``--planted`` items are whole instructions of real rows and
``--windows`` are windows of 20 to 60 words cut from real outputs (a record holding one is truly
contaminated); every other item is 20 to 60 words drawn at random from the data's vocabulary
(text no row holds, but the same words, so the lookup does all its work). The run's state gives each stage's seconds; the decontam step must not cost more than
embedding.

    .venv/bin/python bench/bench_decontam.py              # writes the `decontam` section
    .venv/bin/python bench/bench_decontam.py --shuffle    # also the shuffle-join lookup
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from deltalake import DeltaTable  # noqa: E402

from bench._common import write_section  # noqa: E402
from mergeit_spark.ngrams import normalise  # noqa: E402
from bench.bench_filter import DATA, FILES, load_records  # noqa: E402


def evaluation_set(path: Path, items: int, planted: int, windows: int, seed: int = 7) -> set[str]:
    """Write ``items`` evaluation items (JSON Lines, question/answer) to ``path``; returns the
    instructions planted whole (normalised; each long enough to hold a 13-gram)."""
    rng = random.Random(seed)
    records = load_records(DATA)
    rng.shuffle(records)
    # Items come from rows without a shared template: a tool-use preamble held by thousands of
    # toolformer rows would contaminate all of them, which no real benchmark does.
    records = [r for r in records if "toolformer" not in r["source"]]
    long_rows = [r for r in records if len(r["instruction"].split()) >= 16][:planted]
    # Plain words only: a token such as a URL normalises into many words, and its run would be a
    # real 13-gram of the rows that hold it.
    vocabulary = [w for r in records[:2000] for w in r["output"].split() if w.isalpha()]
    lines = [{"question": r["instruction"], "answer": "A"} for r in long_rows]
    outputs = [r["output"].split() for r in records if len(r["output"].split()) >= 60]
    while len(lines) < items:
        if len(lines) < planted + windows:
            words = outputs[rng.randrange(len(outputs))]
            start, size = rng.randrange(len(words) - 59), rng.randrange(20, 60)
            lines.append({"question": " ".join(words[start:start + size]), "answer": rng.choice("ABCD")})
        else:
            lines.append({"question": " ".join(rng.choices(vocabulary, k=rng.randrange(20, 60))),
                          "answer": rng.choice("ABCD")})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {normalise(r["instruction"]) for r in long_rows}


def contaminated_instructions(root: Path) -> set[str]:
    """The normalised instructions of the rows the run found contaminated (ingest's ids may
    differ from the benchmark's own: ingest normalises the text it hashes)."""
    ids = set(DeltaTable(str(root / "contamination")).to_pyarrow_table(columns=["id"]).column("id").to_pylist())
    records = DeltaTable(str(root / "records")).to_pyarrow_table(columns=["id", "instruction"]).to_pylist()
    return {normalise(r["instruction"]) for r in records if r["id"] in ids}


def run(root: Path, eval_path: Path, *overrides: str) -> tuple[dict, float]:
    paths = ",".join(str(DATA / name) for name in FILES)
    command = [str(REPO / ".venv" / "bin" / "mergeit"), "run", "--until", "embed",
               "--set", f"input.paths=[{paths}]", "--set", f"output.root={root}",
               "--set", f"decontam.eval_paths=[{eval_path}]"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "_state").glob("*.json"))}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--windows", type=int, default=800)
    parser.add_argument("--shuffle", action="store_true", help="also run the shuffle-join lookup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as tmp:
        work = Path(tmp)
        planted = evaluation_set(work / "eval.jsonl", args.items, args.planted, args.windows)
        lookups = [("broadcast", ())]
        if args.shuffle:
            lookups.append(("shuffle join", ("decontam.broadcast_max_ngrams=1",)))
        rows = []
        for name, overrides in lookups:
            states, wall = run(work / name.replace(" ", "-"), work / "eval.jsonl", *overrides)
            summary = states["decontam"]["summary"]
            found = contaminated_instructions(work / name.replace(" ", "-"))
            rows.append((name, states, wall, summary, len(planted & found)))
            print(name, json.dumps(summary)[:300], flush=True)
    lines = [
        f"Input: all of ../shared/data ({', '.join(FILES)}). Evaluation set: {args.items:,} items (JSON "
        f"Lines): {len(planted)} whole instructions of real rows, {args.windows} windows of 20-60 words of real "
        "outputs, the rest 20-60 words drawn at random from the data's vocabulary. One `mergeit run --until "
        "embed` per lookup, a fresh process each; seconds from each stage's state (the embed step embeds the "
        "rows left after decontamination).",
        "",
        "| lookup | records | eval n-grams | contaminated | decontam s | embed s | decontam / embed | run wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, states, wall, summary, _ in rows:
        d, e = float(states["decontam"]["seconds"]), float(states["embed"]["seconds"])
        records = states["ingest"]["counts"].get("records")
        lines.append(f"| {name} | {records:,} | {summary['eval_ngrams']:,} | {summary['contaminated']:,} | "
                     f"{d:.1f} | {e:.1f} | {d / e:.2f} | {wall:.1f} |")
    lines += ["", "Rows whose instruction was planted whole, found contaminated: "
              + ", ".join(f"{name} {hits}/{len(planted)}" for name, *_, hits in rows)
              + ". The other contaminated rows hold an output window (or share its text with another row)."]
    write_section("decontam", "\n".join(lines))


if __name__ == "__main__":
    main()
