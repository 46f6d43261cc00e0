"""Group stage: best match first, one group per row, threshold respected, ids from sorted members."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from pyspark.sql import types as T

from mergeit_spark.ids import group_id
from mergeit_spark.stages import StageContext
from mergeit_spark.stages.group import Group, build_merge_groups, group_cluster

from _merge_helpers import embed_rows, load_rows


def _unit(*angles_deg: float) -> np.ndarray:
    """Unit vectors in the plane at the given angles (cosine = cos of the angle difference)."""
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_best_match_first_differs_from_index_order_greedy():
    # a-b: cos 40deg = .77, a-c: cos 45deg = .71, b-c: cos 5deg = .996, d far from all.
    # Index-order greedy gives a its best partner b and leaves c alone; best-first takes the
    # clearly better pair b-c, after which a has nobody above the threshold.
    ids = ["a", "b", "c", "d"]
    vectors = _unit(0, 40, 45, 130)
    threshold = 0.6
    groups = group_cluster(ids, vectors, threshold, 2)
    assert [members for members, _ in groups] == [["b", "c"]]
    assert groups[0][1] == pytest.approx(np.cos(np.radians(5)), abs=1e-9)

    # Index-order greedy (the reference code's behaviour) would have produced a-b instead.
    sim = vectors @ vectors.T
    used, naive = set(), []
    for i in range(len(ids)):
        if i in used:
            continue
        cands = [j for j in range(i + 1, len(ids)) if j not in used and sim[i, j] > threshold]
        if cands:
            j = max(cands, key=lambda j: sim[i, j])
            used |= {i, j}
            naive.append([ids[i], ids[j]])
    assert naive == [["a", "b"]]


def test_pairs_are_ordered_by_similarity_and_rows_used_once():
    ids = [f"r{i}" for i in range(6)]
    vectors = _unit(0, 2, 20, 21, 60, 90)
    groups = group_cluster(ids, vectors, 0.5, 2)
    sims = [s for _, s in groups]
    assert sims == sorted(sims, reverse=True)
    members = [m for g, _ in groups for m in g]
    assert len(members) == len(set(members))
    assert [g for g, _ in groups] == [["r2", "r3"], ["r0", "r1"], ["r4", "r5"]]


def test_result_does_not_depend_on_row_order():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(30, 8))
    ids = [f"id{i:02d}" for i in range(30)]
    first = group_cluster(ids, base, 0.2, 3)
    perm = rng.permutation(30)
    second = group_cluster([ids[i] for i in perm], base[perm], 0.2, 3)
    assert first == second


def test_threshold_is_strict_and_respected_for_every_pair_of_a_group():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"x{i}" for i in range(40)]
    index = {k: i for i, k in enumerate(ids)}
    for size in (2, 3, 4):
        groups = group_cluster(ids, x, 0.3, size)
        assert groups, "random data should give some groups at this threshold"
        seen = set()
        for members, mean in groups:
            assert 2 <= len(members) <= size
            assert members == sorted(members)
            assert not seen & set(members)
            seen |= set(members)
            pair_sims = [float(x[index[a]] @ x[index[b]]) for a, b in itertools.combinations(members, 2)]
            assert min(pair_sims) > 0.3
            assert mean == pytest.approx(np.mean(pair_sims))
    # Exactly at the threshold is not "above" it.
    v = _unit(0, 60)  # cos 60deg = 0.5
    assert group_cluster(["p", "q"], v, 0.5 - 1e-9, 2) and not group_cluster(["p", "q"], v, 0.5 + 1e-9, 2)


def test_groups_grow_by_best_worst_case_member():
    # Seed: a-b (the closest pair). Candidates c (close to a, far from b) and d (moderately close
    # to both): complete linkage picks d, whose minimum similarity to {a, b} is higher.
    ids = ["a", "b", "c", "d"]
    vectors = _unit(0, 10, -30, 30)
    groups = group_cluster(ids, vectors, 0.5, 3)
    assert groups[0][0] == ["a", "b", "d"]


def test_group_stage_on_spark_with_real_embeddings(spark, settings, shared_data):
    rows = load_rows(shared_data, 60)
    vectors = embed_rows(rows, settings.embed)
    # Two clusters; grouping never crosses a cluster.
    selected = spark.createDataFrame(
        [(r["id"], i % 2, i, 1.0) for i, r in enumerate(rows)],
        "id string, cluster int, rank int, gain double")
    embeddings = spark.createDataFrame(
        [(r["id"], [float(x) for x in v], "m") for r, v in zip(rows, vectors)],
        T.StructType([T.StructField("id", T.StringType()),
                      T.StructField("embedding", T.ArrayType(T.FloatType())),
                      T.StructField("model", T.StringType())]))
    groups = build_merge_groups(selected, embeddings, settings.group.threshold, 2)
    assert groups.schema["cluster"].dataType == T.IntegerType()
    got = sorted((r["group_id"], r["cluster"], tuple(r["member_ids"]), r["similarity"])
                 for r in groups.collect())  # a few dozen rows: test-sized
    expected = []
    for cluster in (0, 1):
        idx = [i for i in range(len(rows)) if i % 2 == cluster]
        for members, sim in group_cluster([rows[i]["id"] for i in idx], vectors[idx],
                                          settings.group.threshold, 2):
            expected.append((group_id(members), cluster, tuple(members), sim))
    assert len(got) == len(expected) > 0
    for g, e in zip(got, sorted(expected)):
        assert g[:3] == e[:3]
        assert g[3] == pytest.approx(e[3], abs=1e-5)
        assert g[0] == group_id(list(reversed(g[2])))  # hash of the sorted members
    members = [m for g in got for m in g[2]]
    assert len(members) == len(set(members))

    stage = Group()
    out = stage.run(StageContext(spark, None, settings), {"selected": selected, "embeddings": embeddings})
    assert out["merge_groups"].count() == len(expected)
    assert Group.inputs == ("selected", "embeddings") and Group.outputs == ("merge_groups",)
