"""Fingerprints say exactly what decides a result (issue 10, item 4):

* a stage is current only if every stage above it is current, and a stage that was rerun makes
  everything below it rerun, even when it computed from unchanged inputs;
* knobs that only change speed (``speed_only``) are in no fingerprint: switching profiles
  (conf/local.yaml -> conf/cluster.yaml) re-embeds nothing;
* what changes results is in it; the partitioning (``spark.shuffle_partitions``) is not, because
  the clustering does not depend on it (tests/test_topics.py shows that half).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from _toy_stages import toy_stages
from mergeit_spark.config import Settings, load_settings
from mergeit_spark.pipeline import Pipeline
from _pipeline_run import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]
# The knobs that must never make a stage rerun (issue 10): batch sizes, partitions, threads, concurrency.
SPEED_KNOBS = {"embed.batch_size", "embed.torch_threads", "embed.partitions", "dedup.block_size",
               "select.block_size", "llm.concurrency", "merge.partitions"}


def _toy(spark, root, *overrides):
    settings = load_settings(overrides=[f"output.root={root}", *overrides], env={})
    return Pipeline(settings, spark=spark, stages=toy_stages())


def _ran(results):
    return [r.name for r in results if not r.skipped]


def test_a_rerun_stage_makes_every_stage_below_it_rerun(spark, tmp_path):
    root = tmp_path / "run"
    pipeline = _toy(spark, root)
    assert _ran(pipeline.run()) == ["source", "double", "total"]
    assert _ran(pipeline.run()) == []
    # `run --stage source --force source`: same inputs, same settings, same fingerprint, but a
    # new version of its table; what was computed from the old version is no longer current.
    assert _ran(pipeline.run(only="source", force="source")) == ["source"]
    assert [row["current"] for row in pipeline.status()] == [True, False, False]
    assert _ran(pipeline.run()) == ["double", "total"]
    assert all(row["current"] for row in pipeline.status())


def test_a_stale_stage_makes_every_stage_below_it_stale(spark, tmp_path):
    root = tmp_path / "run"
    _toy(spark, root).run()
    changed = _toy(spark, root, "embed.model=another-model")      # decides source's result
    assert [row["current"] for row in changed.status()] == [False, False, False]
    assert _ran(changed.run(only="total")) == ["total"]             # run alone, on stale inputs...
    assert [row["current"] for row in changed.status()] == [False, False, False]  # ...still not current
    assert _ran(changed.run()) == ["source", "double", "total"]


def test_speed_only_knobs_rerun_nothing_and_result_knobs_rerun_from_their_stage(spark, tmp_path):
    root = tmp_path / "run"
    _toy(spark, root).run()
    fast = _toy(spark, root, "embed.batch_size=7", "embed.partitions=3", "embed.torch_threads=2",
                "spark.shuffle_partitions=64")
    assert _ran(fast.run()) == []
    assert _ran(_toy(spark, root, "topics.seed=1234").run()) == ["double", "total"]


def test_the_speed_knobs_are_marked_and_every_marked_knob_is_left_out():
    marked = {f"{section.name}.{knob.name}" for section in dataclasses.fields(Settings)
              for knob in dataclasses.fields(section.default_factory) if knob.metadata.get("speed_only")}
    assert SPEED_KNOBS <= marked
    sections = [f.name for f in dataclasses.fields(Settings)]
    base = Settings()
    for dotted in sorted(marked):
        section, name = dotted.split(".")
        value = getattr(getattr(base, section), name)
        other = ((not value) if isinstance(value, bool) else 1 - value if isinstance(value, float) and 0 < value < 1
                 else value * 3 + 5 if isinstance(value, (int, float)) else None)   # a share stays a share
        if other is None:
            continue  # a text knob: nothing generic to change it to
        changed = load_settings(overrides=[f"{dotted}={other}"], env={})
        assert changed.fingerprint(*sections) == base.fingerprint(*sections), dotted
    assert load_settings(overrides=["embed.max_seq_length=128"], env={}).fingerprint("embed") != base.fingerprint("embed")


def _stage_fingerprints(spark, profile: str, root: Path) -> dict[str, str]:
    """Every real stage's fingerprint under a profile, for the same input and run root."""
    settings = load_settings([REPO / "conf" / profile], [f"output.root={root}"], env={})
    pipeline = Pipeline(settings, spark=spark)
    return {stage.name: pipeline.fingerprint(stage) for stage in pipeline.stages}


def test_switching_from_the_laptop_to_the_cluster_profile_reembeds_nothing(spark, tmp_path):
    local = _stage_fingerprints(spark, "local.yaml", tmp_path / "run")
    cluster = _stage_fingerprints(spark, "cluster.yaml", tmp_path / "run")
    assert list(local) == list(STAGE_ORDER)
    # The profiles differ in speed knobs and Spark's partitioning for every filtering stage; the
    # LLM endpoint they point at (llm.base_url, llm.max_tokens) decides merges.
    filtering = ("ingest", "embed", "topics", "dedup", "select", "group")
    assert {s: local[s] for s in filtering} == {s: cluster[s] for s in filtering}
    assert local["merge"] != cluster["merge"]


@pytest.mark.parametrize("partitions", [1, 200])
def test_the_topics_fingerprint_does_not_depend_on_spark_partitioning(spark, tmp_path, partitions):
    """The k-means input order is fixed independently of ``spark.sql.shuffle.partitions``
    (tests/test_topics.py clusters the same embeddings under 2 and 16 partitions and gets the
    same clusters), so the partition count is rightly in no fingerprint."""
    root = tmp_path / "run"
    default = _stage_fingerprints(spark, "default.yaml", root)
    settings = load_settings([REPO / "conf" / "default.yaml"],
                             [f"output.root={root}", f"spark.shuffle_partitions={partitions}"], env={})
    pipeline = Pipeline(settings, spark=spark)
    assert {s.name: pipeline.fingerprint(s) for s in pipeline.stages} == default


def test_a_stage_whose_declared_version_changes_reruns_with_everything_below(spark, tmp_path, monkeypatch):
    """A fix to a stage's algorithm (its ``version`` bumped) reruns it on an existing run root,
    and the stages below it; the stages above stay current."""
    from _toy_stages import Double
    root = tmp_path / "run"
    _toy(spark, root).run()
    monkeypatch.setattr(Double, "version", "2")
    bumped = _toy(spark, root)
    assert [row["current"] for row in bumped.status()] == [True, False, False]
    assert _ran(bumped.run()) == ["double", "total"]
    assert all(row["current"] for row in bumped.status())
