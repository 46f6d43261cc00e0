"""Decontamination against a large evaluation set, timed beside the embed step of the same run.

All of ../shared/data goes through ``mergeit run --until embed`` (ingest → decontam → embed) with
an evaluation set of ``--items`` items (100,000 by default). No public benchmark of that size is
offline here, so the items are made from the shared data's own text: windows of 20 to 60 words
cut from outputs of rows 0..N of the shuffled records (each window an item; a record holding one
is truly contaminated), plus as many items of shuffled words (text no row holds). ``--planted``
of the items are whole instructions of other rows, so the count of contaminated rows has a floor
to check. The run's state gives each stage's seconds; the decontam step must not cost more than
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

from bench._common import write_section  # noqa: E402
from bench.bench_filter import DATA, FILES, load_records  # noqa: E402


def evaluation_set(path: Path, items: int, planted: int, seed: int = 7) -> int:
    """Write ``items`` evaluation items (JSON Lines, question/answer) to ``path``; returns how
    many of them are instructions of real rows (planted, each long enough to hold a 13-gram)."""
    rng = random.Random(seed)
    records = load_records(DATA)
    rng.shuffle(records)
    long_instructions = [r["instruction"] for r in records if len(r["instruction"].split()) >= 16]
    vocabulary = [w for r in records[:2000] for w in r["output"].split()]
    lines, made = [], 0
    for text in long_instructions[:planted]:
        lines.append({"question": text, "answer": "A"})
        made += 1
    outputs = [r["output"].split() for r in records if len(r["output"].split()) >= 60]
    while len(lines) < items:
        if len(lines) % 2:
            words = outputs[rng.randrange(len(outputs))]
            start, size = rng.randrange(len(words) - 59), rng.randrange(20, 60)
            lines.append({"question": " ".join(words[start:start + size]), "answer": rng.choice("ABCD")})
        else:
            lines.append({"question": " ".join(rng.choices(vocabulary, k=rng.randrange(20, 60))),
                          "answer": rng.choice("ABCD")})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return made


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
    parser.add_argument("--shuffle", action="store_true", help="also run the shuffle-join lookup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as tmp:
        work = Path(tmp)
        planted = evaluation_set(work / "eval.jsonl", args.items, args.planted)
        lookups = [("broadcast", ())]
        if args.shuffle:
            lookups.append(("shuffle join", ("decontam.broadcast_max_ngrams=1",)))
        rows = []
        for name, overrides in lookups:
            states, wall = run(work / name.replace(" ", "-"), work / "eval.jsonl", *overrides)
            summary = states["decontam"]["summary"]
            rows.append((name, states, wall, summary))
            print(name, json.dumps(summary)[:300], flush=True)
    lines = [
        f"Input: all of ../shared/data ({', '.join(FILES)}). Evaluation set: {args.items:,} items (JSON "
        f"Lines): {planted} are whole instructions of real rows, half of the rest 20-60-word windows of "
        "real outputs, half shuffled words. One `mergeit run --until embed` per lookup, a fresh process "
        "each; seconds from each stage's state.",
        "",
        "| lookup | records | eval n-grams | contaminated | decontam s | embed s | decontam / embed | run wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, states, wall, summary in rows:
        d, e = float(states["decontam"]["seconds"]), float(states["embed"]["seconds"])
        records = states["ingest"]["counts"].get("records")
        lines.append(f"| {name} | {records:,} | {summary['eval_ngrams']:,} | {summary['contaminated']:,} | "
                     f"{d:.1f} | {e:.1f} | {d / e:.2f} | {wall:.1f} |")
    lines += ["", f"Every planted instruction's row must be contaminated: {planted} planted, "
                  f"{rows[0][3]['contaminated']:,} rows contaminated (windows of outputs add real matches)."]
    write_section("decontam", "\n".join(lines))


if __name__ == "__main__":
    main()
