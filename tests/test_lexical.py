"""The lexical pass of dedup: MinHash + LSH over word shingles, on real text with planted near-copies.

The minhash functions are checked against brute force; the stage runs in real Spark on real rows
from ../shared/data whose embeddings are drawn at random (no model: the semantic pass then finds
only the pairs planted for it), so every lexical near-copy here is one the semantic pass misses.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from _filter_helpers import read_rows, records_frame, with_ids
from mergeit_spark import minhash
from mergeit_spark.minhash import LexicalIndex, MinHashParams, ShingleSets, shingles, signatures, text_jaccard
from mergeit_spark.ngrams import words
from mergeit_spark.stages.dedup import (DEDUP_SCHEMA, DUPLICATE, KEPT, LEXICAL, SEMANTIC, Dedup, find_duplicates,
                                        leader_dedup, leader_pass)

PARAMS = MinHashParams()  # the defaults of DedupSettings
DIM = 32


def _text(row: dict) -> str:
    return f"{row['instruction']} {row['input']}".strip()


def _natural(shared_data, limit: int = 160) -> list[dict]:
    """Real rows with free text (no tool preambles), distinct texts."""
    rows = with_ids(read_rows(shared_data, "mergeit-6k.json", limit)
                    + read_rows(shared_data, "gpteacher-roleplay.json", 40))
    seen, out = set(), []
    for r in rows:
        key = " ".join(words(_text(r)))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _long(rows: list[dict], n: int, min_words: int = 20) -> list[dict]:
    return [r for r in rows if len(r["instruction"].split()) >= min_words][:n]


def _brute_force(texts: list[str], threshold: float) -> np.ndarray:
    """Exact Jaccard of every pair, as Python sets, 0 below the threshold."""
    sets = [{" ".join(w[i:i + PARAMS.shingle]) for i in range(max(1, len(w) - PARAMS.shingle + 1))} if w else set()
            for w in (words(t) for t in texts)]
    out = np.zeros((len(sets), len(sets)))
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            if a and b:
                jac = len(a & b) / len(a | b)
                out[i, j] = jac if jac >= threshold else 0.0
    return out


# -- the minhash functions --------------------------------------------------------------------

def test_shingles_short_and_empty_texts():
    assert shingles("", 3).size == 0 and shingles(None, 3).size == 0 and shingles(" ?! ", 3).size == 0
    assert shingles("Tell me", 3).size == 1  # shorter than a shingle: the whole text is its one shingle
    assert shingles("Tell me", 3)[0] != shingles("me Tell", 3)[0]
    assert shingles("a b c d e", 3).size == 3
    assert np.array_equal(shingles("a b c a b c", 3), np.unique(shingles("a b c a b c", 3)))  # a set


def test_identical_and_edited_real_texts(shared_data):
    rows = _long(_natural(shared_data), 12)
    for r in rows:
        text = _text(r)
        w = text.split()
        edits = {
            "identical": text,
            "case": text.upper(),
            "punctuation": text.replace(",", " ,").rstrip(".") + "!!",
            "prefix": "Please answer: " + text,
            "dropped word": " ".join(w[:len(w) // 2] + w[len(w) // 2 + 1:]),
        }
        jaccard = dict(zip(edits, text_jaccard([text] * len(edits), list(edits.values()), PARAMS.shingle)))
        assert jaccard["identical"] == jaccard["case"] == jaccard["punctuation"] == 1.0
        assert jaccard["prefix"] >= PARAMS.threshold and jaccard["dropped word"] >= PARAMS.threshold, jaccard
        for name, edited in edits.items():  # each a candidate of the original, verified exactly
            found = LexicalIndex.of_texts([text, edited], PARAMS).similarity(np.array([0]), np.array([1]))
            assert found[0, 0] == pytest.approx(jaccard[name])


def test_index_equals_brute_force_on_real_rows_and_pairs_no_unrelated_rows(shared_data):
    """LSH candidates + exact verification give what an all-pairs Jaccard gives (the planted
    copies found, no unrelated real row paired); the chance to miss a pair at 0.8 is 4e-4."""
    rows = _natural(shared_data)
    texts = [_text(r) for r in rows]
    originals = _long(rows, 10)
    texts += [("Question: " + _text(r)).lower() for r in originals]
    index = LexicalIndex.of_texts(texts, PARAMS)
    assert index.active.all()
    everyone = np.arange(len(texts))
    got = index.similarity(everyone, everyone)
    expected = _brute_force(texts, PARAMS.threshold)
    np.testing.assert_allclose(got, expected)
    pairs = {(i, j) for i, j in zip(*np.nonzero(np.triu(got, k=1)))}
    n = len(rows)
    assert pairs == {(rows.index(r), n + k) for k, r in enumerate(originals)}  # the plants, nothing else
    assert index.candidates(everyone, everyone).sum() < 4 * len(texts)  # few candidates to verify


def test_jaccard_and_take_are_exact():
    rng = np.random.default_rng(3)
    sets = [np.unique(rng.integers(0, 40, size=rng.integers(0, 15)).astype(np.uint64)) for _ in range(50)]
    flat = ShingleSets(np.concatenate([[0], np.cumsum([s.size for s in sets])]).astype(np.int64),
                       np.concatenate(sets))
    left, right = rng.integers(0, 50, 400), rng.integers(0, 50, 400)
    expected = [len(np.intersect1d(sets[a], sets[b])) / max(1, len(np.union1d(sets[a], sets[b])))
                for a, b in zip(left, right)]
    np.testing.assert_allclose(flat.jaccard(left, right), expected)
    picked = flat.take(np.array([7, 0, 7, 49]))
    for k, p in enumerate([7, 0, 7, 49]):
        assert np.array_equal(picked.values[picked.offsets[k]:picked.offsets[k + 1]], sets[p])


def test_signatures_do_not_depend_on_the_chunking(monkeypatch, shared_data):
    sets = ShingleSets.of_texts([_text(r) for r in _natural(shared_data, 40)] + [""], 3)
    whole = signatures(sets, 100, 1)
    monkeypatch.setattr(minhash, "_CHUNK_ELEMENTS", 7)
    assert np.array_equal(signatures(sets, 100, 1), whole)
    assert (whole[-1] == np.iinfo(np.uint64).max).all()  # no shingles: no minimum
    assert not np.array_equal(signatures(sets, 100, 2), whole)  # the seed draws other permutations


def test_signatures_are_the_same_in_another_process(shared_data):
    texts = [_text(r) for r in _natural(shared_data, 20)]
    here = signatures(ShingleSets.of_texts(texts, 3), 20, 1)
    code = ("import json, sys; from mergeit_spark.minhash import ShingleSets, signatures; "
            "texts = json.load(sys.stdin); "
            "print(json.dumps(signatures(ShingleSets.of_texts(texts, 3), 20, 1).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345"})  # Python's own str hash differs there
    assert np.array_equal(np.array(json.loads(out.stdout), dtype=np.uint64), here)


def test_templated_texts_are_left_to_the_semantic_pass(shared_data):
    """Tool-use prompts share a long preamble: by shingles any two of one tool are near-copies,
    whatever they ask. They are templated; free-text rows beside them are not."""
    tools = [r for r in read_rows(shared_data, "gpteacher-toolformer.json", 400)
             if r["instruction"].startswith("toolformer: enabled\ntoolformer access: wikipedia\n")][:12]
    assert len(tools) == 12
    natural = _natural(shared_data, 30)
    texts = [_text(r) for r in tools + natural]
    index = LexicalIndex.of_texts(texts, PARAMS)
    assert not index.active[:12].any() and index.active[12:].all()
    plain = dataclasses.replace(PARAMS, template_rows=10 ** 9)  # the rule off: the preamble pairs them
    assert (np.triu(LexicalIndex.of_texts(texts[:12], plain).similarity(np.arange(12), np.arange(12)), k=1) > 0).any()
    assert not index.similarity(np.arange(len(texts)), np.arange(len(texts)))[:12].any()
    # Judged over the whole batch: four of them alone are not a template, with the others they are.
    assert LexicalIndex.of_texts(texts[:4], PARAMS).active.all()
    assert not LexicalIndex.of_texts(texts[:4], PARAMS, others=texts[4:12]).active.any()


# -- the leader pass with both measures -------------------------------------------------------

def _naive_both(vectors, index: LexicalIndex, threshold: float):
    """Reference: rows in the given order; each compared with every kept row by both measures."""
    n = len(vectors)
    jac = index.similarity(np.arange(n), np.arange(n))
    kept: list[int] = []
    out = []
    for i in range(n):
        cos = {j: float(vectors[i].astype(np.float64) @ vectors[j].astype(np.float64)) for j in kept}
        sem = [j for j in kept if cos[j] >= threshold]
        lex = [j for j in kept if jac[i, j] >= index.threshold]
        if sem:
            best = max(sem, key=lambda j: (cos[j], -j))
            out.append((False, best, cos[best], False))
        elif lex:
            best = max(lex, key=lambda j: (jac[i, j], -j))
            out.append((False, best, jac[i, best], True))
        else:
            kept.append(i)
            out.append((True, -1, np.nan, False))
    return out


@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_leader_pass_equals_a_naive_rule_over_both_measures(shared_data, block_size):
    rng = np.random.default_rng(5)
    rows = _natural(shared_data, 120)
    texts = [_text(r) for r in rows]
    texts += [t.upper() for t in texts[:15]] + ["Please answer: " + t for t in texts[5:20]]
    vectors = rng.normal(size=(len(texts), DIM)).astype(np.float32)
    vectors[-10:] = vectors[:10] + rng.normal(scale=0.02, size=(10, DIM))  # semantic twins too
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(texts))
    vectors, texts = vectors[order], [texts[i] for i in order]
    index = LexicalIndex.of_texts(texts, PARAMS)
    got = leader_pass(vectors, 0.95, block_size, index)
    expected = _naive_both(vectors, index, 0.95)
    assert got.kept.tolist() == [e[0] for e in expected]
    assert got.target.tolist() == [e[1] for e in expected]
    assert got.lexical.tolist() == [e[3] for e in expected]
    np.testing.assert_allclose(got.similarity, [e[2] for e in expected], atol=1e-5)
    assert got.lexical.sum() >= 20 and (~got.kept & ~got.lexical).sum() >= 5
    kept = np.flatnonzero(got.kept)  # kept rows are pairwise near-copies by neither measure
    assert not (np.triu(index.similarity(kept, kept), k=1) > 0).any()
    assert (np.triu(vectors[kept] @ vectors[kept].T, k=1) < 0.95).all()
    semantic_only = leader_dedup(vectors, 0.95, block_size)
    assert np.array_equal(leader_pass(vectors, 0.95, block_size).kept, semantic_only[0])


# -- the stage, in Spark ----------------------------------------------------------------------

@dataclasses.dataclass
class Plant:
    records: list[dict]
    lexical: dict[str, str]    # copy id -> original id: lexical near-copies, same cluster
    across: tuple[str, str]    # (copy id, original id): a near-copy in another cluster
    follower: tuple[str, str]  # (id, the across copy it copies): re-pointed at the original
    semantic: tuple[str, str]  # (id, twin id): unrelated texts, near-identical vectors


def _copy(row: dict, instruction: str, tag: str) -> dict:
    from mergeit_spark.ids import content_id
    output = row["output"] + f" ({tag})"
    return dict(row, id=content_id(instruction, row["input"], output), instruction=instruction, output=output,
                source="planted")


def _plant(shared_data) -> Plant:
    rows = _natural(shared_data)
    originals = _long(rows, 8)
    copies, lexical = [], {}
    for k, r in enumerate(originals[:6]):
        words_ = r["instruction"].split()
        edited = ("Please answer: " + r["instruction"] if k % 3 == 0 else r["instruction"].lower() if k % 3 == 1
                  else " ".join(words_[:5] + words_[6:]))
        copies.append(_copy(r, edited, f"copy {k}"))
        lexical[copies[-1]["id"]] = r["id"]
    across = _copy(originals[6], "Question: " + originals[6]["instruction"], "across")
    follower = _copy(across, across["instruction"].upper(), "follower")
    twin = dict(_copy(originals[7], "Name three primary colours.", "twin"), input="")
    return Plant(rows + copies + [across, follower, twin], lexical, (across["id"], originals[6]["id"]),
                 (follower["id"], across["id"]), (twin["id"], originals[7]["id"]))


def _frames(spark, plant: Plant, clusters: int = 3):
    """records, embeddings, topics, centroids: random unit vectors (the semantic twin beside its
    original), clusters round robin with the copies beside their originals (the cross-cluster
    copy and its follower in the next cluster), distances that put each original first."""
    rng = np.random.default_rng(11)
    ids = [r["id"] for r in plant.records]
    vectors = rng.normal(size=(len(ids), DIM))
    at = {rid: k for k, rid in enumerate(ids)}
    twin, original = plant.semantic
    vectors[at[twin]] = vectors[at[original]] + rng.normal(scale=0.01, size=DIM)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cluster = {rid: k % clusters for k, rid in enumerate(ids)}
    distance = {rid: float(rng.uniform(0.1, 0.5)) for rid in ids}
    for copy, source in [*plant.lexical.items(), plant.semantic]:
        cluster[copy], distance[copy] = cluster[source], distance[source] + 1.0
    across, source = plant.across
    cluster[across] = (cluster[source] + 1) % clusters
    distance[across] = distance[source] + 1.0
    follower, _ = plant.follower
    cluster[follower], distance[follower] = cluster[across], distance[across] + 1.0
    embeddings = spark.createDataFrame([(rid, vectors[at[rid]].astype(np.float32).tolist()) for rid in ids],
                                       "id string, embedding array<float>")
    topics = spark.createDataFrame([(rid, cluster[rid], distance[rid]) for rid in ids],
                                   "id string, cluster int, distance double")
    centres = [(c, vectors[[at[r] for r in ids if cluster[r] == c]].mean(axis=0).tolist(),
                sum(1 for r in ids if cluster[r] == c)) for c in range(clusters)]
    centroids = spark.createDataFrame(centres, "cluster int, embedding_center array<double>, size long")
    return records_frame(spark, plant.records), embeddings, topics, centroids


@pytest.fixture(scope="module")
def planted(spark, shared_data):
    plant = _plant(shared_data)
    return plant, _frames(spark, plant)


@pytest.fixture(scope="module")
def stage_rows(spark, planted, settings, tmp_path_factory):
    """The dedup stage run on the planted rows with the default settings, its table written and
    read back: the rows by id (the tests of the default result share this one run)."""
    from mergeit_spark.stages import StageContext
    from mergeit_spark.tables import TableStore
    _, (records, embeddings, topics, centroids) = planted
    store = TableStore(spark, tmp_path_factory.mktemp("lexical") / "run")
    stage = Dedup()
    assert stage.inputs == ("records", "embeddings", "topics", "centroids") and stage.version == "2"
    out = stage.run(StageContext(spark, store, settings), {
        "records": records, "embeddings": embeddings, "topics": topics, "centroids": centroids})
    store.write(out["dedup"], "dedup")
    back = store.read("dedup")
    assert back.columns == [f.name for f in DEDUP_SCHEMA.fields] == [
        "id", "cluster", "status", "duplicate_of", "similarity", "method"]
    return {r["id"]: r.asDict() for r in back.collect()}


def _result(frames, settings, **changes) -> dict[str, dict]:
    records, embeddings, topics, centroids = frames
    dedup = dataclasses.replace(settings.dedup, **changes)
    result = find_duplicates(embeddings, topics, centroids, dedup, records=records)
    return {r["id"]: r.asDict() for r in result.collect()}


def _check_invariants(rows: dict[str, dict], n: int) -> None:
    assert len(rows) == n
    assert sum(r["status"] == KEPT for r in rows.values()) + sum(r["status"] == DUPLICATE for r in rows.values()) == n
    for r in rows.values():
        if r["status"] == KEPT:
            assert r["duplicate_of"] is None and r["similarity"] is None and r["method"] is None
        else:
            assert rows[r["duplicate_of"]]["status"] == KEPT and r["method"] in (SEMANTIC, LEXICAL)


def test_stage_finds_the_near_copies_the_semantic_pass_misses(planted, stage_rows):
    plant, _ = planted
    rows = stage_rows
    _check_invariants(rows, len(plant.records))
    texts = {r["id"]: _text(r) for r in plant.records}
    for copy, original in plant.lexical.items():
        assert (rows[copy]["status"], rows[copy]["duplicate_of"], rows[copy]["method"]) == (
            DUPLICATE, original, LEXICAL)
        assert rows[copy]["similarity"] == pytest.approx(
            text_jaccard([texts[copy]], [texts[original]], PARAMS.shingle)[0])
        assert rows[original]["status"] == KEPT
    twin, original = plant.semantic
    assert (rows[twin]["duplicate_of"], rows[twin]["method"]) == (original, SEMANTIC)
    assert rows[twin]["similarity"] > 0.99
    # Across clusters: the copy (farther from its centre) is a duplicate of the original; the row
    # that pointed at the copy in its own cluster is re-pointed, with its Jaccard to the original.
    across, source = plant.across
    follower, _ = plant.follower
    assert rows[across]["cluster"] != rows[source]["cluster"]
    assert (rows[across]["duplicate_of"], rows[across]["method"]) == (source, LEXICAL)
    assert (rows[follower]["duplicate_of"], rows[follower]["method"]) == (source, LEXICAL)
    assert rows[follower]["similarity"] == pytest.approx(
        text_jaccard([texts[follower]], [texts[source]], PARAMS.shingle)[0])
    assert sum(r["method"] == LEXICAL for r in rows.values()) == len(plant.lexical) + 2  # nothing unplanted


def test_without_the_cross_cluster_check_the_split_copy_stays_kept(planted, settings):
    plant, frames = planted
    rows = _result(frames, settings, cross_cluster=False)
    _check_invariants(rows, len(plant.records))
    across, _ = plant.across
    follower, _ = plant.follower
    assert rows[across]["status"] == KEPT
    assert (rows[follower]["duplicate_of"], rows[follower]["method"]) == (across, LEXICAL)


def test_minhash_off_gives_exactly_the_semantic_result(planted, settings):
    plant, frames = planted
    records, embeddings, topics, centroids = frames
    off = _result(frames, settings, minhash=False)
    alone = {r["id"]: r.asDict() for r in find_duplicates(embeddings, topics, centroids, settings.dedup).collect()}
    assert off == alone  # no records: the semantic pass alone, the same rows
    assert {r["method"] for r in off.values()} == {None, SEMANTIC}
    _check_invariants(off, len(plant.records))
    for copy in plant.lexical:
        assert off[copy]["status"] == KEPT


# -- the increment ----------------------------------------------------------------------------

def test_increment_checks_new_rows_lexically_against_kept_rows_and_each_other(shared_data):
    """``ClusterIncrement`` with the lexical pass: a new row that copies a kept row is its lexical
    duplicate; of two new copies of one text the later (in keep order) is a duplicate of the
    other; templates are judged with the cluster's old duplicates counted."""
    from mergeit_spark.stages.cluster_increment import ClusterIncrement
    rows = _long(_natural(shared_data), 4)
    texts = [_text(r) for r in rows]
    rng = np.random.default_rng(2)
    vec = rng.normal(size=(8, DIM))
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    frame = pd.DataFrame([
        dict(id="a0", role="kept", embedding=vec[0].tolist(), rank=0.0, grouped=False, text=texts[0]),
        dict(id="a1", role="kept", embedding=vec[1].tolist(), rank=np.nan, grouped=False, text=texts[1]),
        dict(id="n1", role="new", embedding=vec[2].tolist(), distance=0.3, text="Please answer: " + texts[0]),
        dict(id="n2", role="new", embedding=vec[3].tolist(), distance=0.1, text=texts[2]),
        dict(id="n3", role="new", embedding=vec[4].tolist(), distance=0.2, text=texts[2].upper()),
        dict(id="n4", role="new", embedding=vec[5].tolist(), distance=0.4, text=texts[3]),
    ], columns=["id", "role", "embedding", "distance", "rank", "grouped", "target_id", "similarity", "text"])
    frame.insert(1, "cluster", 4)
    lexical = ClusterIncrement(0.95, 4, 10, 4, 0.55, 2, PARAMS)
    dedup = lexical(frame).query("table == 'dedup'").set_index("id")
    assert sorted(dedup.index) == ["n1", "n2", "n3", "n4"]
    assert tuple(dedup.loc["n1", ["status", "duplicate_of", "method"]]) == (DUPLICATE, "a0", LEXICAL)
    assert dedup.loc["n1", "similarity"] == pytest.approx(
        text_jaccard([texts[0]], ["Please answer: " + texts[0]], PARAMS.shingle)[0])
    assert tuple(dedup.loc["n3", ["status", "duplicate_of", "method"]]) == (DUPLICATE, "n2", LEXICAL)
    assert dedup.loc["n2", "status"] == dedup.loc["n4", "status"] == KEPT
    assert dedup.loc["n2", "method"] is None
    semantic_only = ClusterIncrement(0.95, 4, 10, 4, 0.55, 2)(frame).query("table == 'dedup'")
    assert (semantic_only["status"] == KEPT).all()
    # The same new copy, among five old duplicates of its text: a template now, left to embeddings.
    old = pd.DataFrame([dict(id=f"d{k}", cluster=4, role="duplicate", text=texts[0]) for k in range(5)])
    templated = lexical(pd.concat([frame, old], ignore_index=True)).query("table == 'dedup'").set_index("id")
    assert templated.loc["n1", "status"] == KEPT


def test_increment_pass_in_spark_adds_lexical_duplicates(spark, shared_data, settings):
    """``curate_new_rows`` (the dedup stage's extend) with the records: new rows copying a kept
    row's text come out lexical duplicates of it."""
    from mergeit_spark.stages.cluster_increment import curate_new_rows, curated_rows
    plant = _plant(shared_data)
    records, embeddings, topics, centroids = _frames(spark, plant)
    old_ids = [r["id"] for r in plant.records if r["source"] != "planted"]
    new_ids = list(plant.lexical)
    dedup = find_duplicates(embeddings.filter(F.col("id").isin(old_ids)), topics.filter(F.col("id").isin(old_ids)),
                            centroids, dataclasses.replace(settings.dedup, cross_cluster=False), records=records)
    tables = {"dedup": dedup, "centroids": centroids, "records": records,
              "selected": spark.createDataFrame([], "id string, cluster int, rank int, gain double"),
              "merge_groups": spark.createDataFrame([], "group_id string, cluster int, member_ids array<string>, "
                                                        "similarity double")}
    new_topics = topics.filter(F.col("id").isin(new_ids))
    rows = {r["id"]: r for r in curated_rows(curate_new_rows(new_topics, embeddings, tables, settings),
                                              "dedup").collect()}
    assert set(rows) == set(new_ids)
    for copy, original in plant.lexical.items():
        assert (rows[copy]["status"], rows[copy]["duplicate_of"], rows[copy]["method"]) == (
            DUPLICATE, original, LEXICAL)
