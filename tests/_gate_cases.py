"""The labelled merge-gate set: cases derived from ``tests/data/gate_cases.json``.

That file holds 20 groups of two real records of ``../shared/data/mergeit-6k.json`` (cited by
array index and content id, not copied), a good merge written for the project for each group, and
a reworded answer to one source alone. From them come, per group:

  good           the written merge (both requests asked, both answered, reworded)        good
  good_concat    the scripted test server's merge: instructions and outputs joined         good
  drop_answer    the merged instruction (asks for both) answered for one source only       bad
  drop_request   an instruction for one source only, with the merged output               bad
  single         one source alone, reworded (instruction and output)                      bad
  copy           one source verbatim                                                       bad
  unrelated      the good merge of another group, far in topic                             bad
  truncated      the good merge with its output cut at 45 % of its length                  bad

Groups with an odd number (g01, g03, ...) are the ``tune`` split the gate's thresholds were chosen
on; even groups are the ``check`` split that only confirms them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mergeit_spark.ids import content_id

from fake_openai import merged_content

CASES_FILE = Path(__file__).parent / "data" / "gate_cases.json"
GOOD_KINDS = ("good", "good_concat")
BAD_KINDS = ("drop_answer", "drop_request", "single", "copy", "unrelated", "truncated")
TRUNCATE_AT = 0.45


@dataclass(frozen=True)
class GateCase:
    name: str                      # "g01-good"
    group: str
    kind: str
    split: str                     # tune | check
    sources: tuple[dict, ...]      # the real records (instruction, input, output, id)
    merged: dict = field(hash=False)

    @property
    def good(self) -> bool:
        return self.kind in GOOD_KINDS


def _source(records: list[dict], ref: dict) -> dict:
    raw = records[ref["index"]]
    rec = {"instruction": raw["instruction"].strip(), "input": (raw.get("input") or "").strip(),
           "output": raw["output"].strip()}
    rec["id"] = content_id(rec["instruction"], rec["input"], rec["output"])
    if rec["id"] != ref["id"]:
        raise ValueError(f"{CASES_FILE.name}: record {ref['index']} has id {rec['id']}, the set "
                         f"cites {ref['id']}: the shared data changed")
    return rec


def _truncate(text: str, share: float) -> str:
    cut = text[:int(len(text) * share)]
    return cut[:cut.rfind(" ")].rstrip() if " " in cut else cut


def _texts(instruction: str, input_: str, output: str) -> dict:
    return {"instruction": instruction, "input": input_, "output": output}


@lru_cache(maxsize=2)
def load_cases(shared_data: Path) -> tuple[GateCase, ...]:
    spec = json.loads(CASES_FILE.read_text())
    records = json.loads((shared_data / spec["source_file"]).read_text())
    groups = spec["groups"]
    cases: list[GateCase] = []
    for n, grp in enumerate(groups):
        sources = tuple(_source(records, ref) for ref in grp["sources"])
        good, single, kept = grp["merged"], grp["single"], sources[grp["keeps"]]
        far = groups[(n + len(groups) // 2) % len(groups)]["merged"]
        variants = {
            "good": good,
            "good_concat": json.loads(merged_content(sources)),
            "drop_answer": _texts(good["instruction"], good["input"], single["output"]),
            "drop_request": _texts(single["instruction"], single["input"], good["output"]),
            "single": single,
            "copy": _texts(kept["instruction"], kept["input"], kept["output"]),
            "unrelated": far,
            "truncated": _texts(good["instruction"], good["input"], _truncate(good["output"], TRUNCATE_AT)),
        }
        split = "tune" if n % 2 == 0 else "check"
        for kind, merged in variants.items():
            cases.append(GateCase(f"{grp['group']}-{kind}", grp["group"], kind, split, sources,
                                  dict(merged)))
    return tuple(cases)


# -- judging the set ------------------------------------------------------------------------------
def judge_cases(cases: tuple[GateCase, ...], gate_settings, embed_settings) -> list:
    """The gate's verdict on every case, exactly as the stage judges: the merged instruction text
    embedded by the embed stage's ``encode_texts``, the sources' embeddings likewise."""
    import numpy as np

    from mergeit_spark.llm.gate import GroupSources, embedding_text, judge
    from mergeit_spark.models import encode_texts

    sources = {s["id"]: s for case in cases for s in case.sources}
    ids = sorted(sources)
    vectors = dict(zip(ids, encode_texts(
        [embedding_text(sources[i]["instruction"], sources[i]["input"]) for i in ids], embed_settings)))
    merged_vectors = encode_texts([embedding_text(c.merged["instruction"], c.merged["input"])
                                   for c in cases], embed_settings)
    groups = [GroupSources(c.sources, np.stack([vectors[s["id"]] for s in c.sources])) for c in cases]
    return judge([c.merged for c in cases], groups, merged_vectors, gate_settings)


# Which bad kinds each threshold exists to stop (the others have their own check).
TARGETS = {"min_source_similarity": ("unrelated",),
           "min_request_coverage": ("drop_request", "single", "copy")}


def choose_thresholds(cases: tuple[GateCase, ...], verdicts: list,
                      good_share: float = 0.9) -> dict[str, float]:
    """The gate's thresholds from labelled cases (run on the tune split):

    * ``min_source_similarity`` and ``min_request_coverage``: halfway between the highest value of
      a bad case of their target kinds and the lowest value of a good case;
    * ``min_output_coverage``: a merge that drops an answer deletes that source's content from the
      curated set, while a refused merge only keeps both originals, so this one is as strict as
      still accepts ``good_share`` of the good cases: halfway between the good values on either side
      of that cut, and never below halfway between the highest bad case every other check lets
      through and the lowest good case.
    The verdicts' numbers do not depend on the thresholds, so any settings give the same numbers.
    """
    def value(verdict, name: str) -> float:
        return {"min_source_similarity": verdict.min_source_similarity,
                "min_request_coverage": verdict.request_coverage}[name]

    good = [v for c, v in zip(cases, verdicts) if c.good]
    chosen = {}
    for name, kinds in TARGETS.items():
        bad = [v for c, v in zip(cases, verdicts) if c.kind in kinds]
        chosen[name] = (max(value(v, name) for v in bad) + min(value(v, name) for v in good)) / 2
    others = [v.output_coverage for c, v in zip(cases, verdicts)
              if not c.good and set(v.failed) <= {"output_coverage"}]
    covered = sorted(v.output_coverage for v in good)
    cut = int(len(covered) * (1 - good_share) + 1e-9)   # goods we may refuse
    midpoint = (max(others, default=0.0) + covered[0]) / 2
    chosen["min_output_coverage"] = max((covered[cut - 1] + covered[cut]) / 2, midpoint) if cut else midpoint
    return chosen
