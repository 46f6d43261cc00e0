"""Export round trip: every format, re-read by a datasets loader and by plain json/pyarrow,
gives exactly the rows of ``final``."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from mergeit_spark.export import ALPACA_FIELDS, FINAL_FIELDS, FORMATS, ExportError, export_final

from _pipeline_tables import finalized_run

SUFFIX = {"alpaca-json": "json", "jsonl": "jsonl", "parquet": "parquet"}
LOADER = {"alpaca-json": "json", "jsonl": "json", "parquet": "parquet"}


@pytest.fixture(scope="module")
def exported(spark, settings, shared_data, tmp_path_factory):
    store, _ = finalized_run(spark, settings, shared_data, tmp_path_factory)
    out = tmp_path_factory.mktemp("export")
    files = {fmt: Path(export_final(store, out / f"final.{SUFFIX[fmt]}", fmt).local) for fmt in FORMATS}
    # test-side only: final has a couple of dozen rows here
    rows = sorted((r.asDict() for r in store.read("final").collect()), key=lambda r: r["id"])
    return store, out, files, rows


def _expected(rows, fmt):
    fields = ALPACA_FIELDS if fmt == "alpaca-json" else FINAL_FIELDS
    return [{f: r[f] for f in fields} for r in rows]


def _plain_read(path, fmt):
    if fmt == "alpaca-json":
        return json.loads(path.read_text(encoding="utf-8"))
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_reader_round_trip(exported, fmt):
    _, _, files, rows = exported
    got = _plain_read(files[fmt], fmt)
    assert len(got) == len(rows)
    assert got == _expected(rows, fmt)  # same content, same order (by id)


@pytest.mark.parametrize("fmt", FORMATS)
def test_datasets_loader_round_trip(exported, fmt, tmp_path):
    _, _, files, rows = exported
    ds = datasets.load_dataset(LOADER[fmt], data_files=str(files[fmt]), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == len(rows)
    assert [dict(r) for r in ds] == _expected(rows, fmt)


def test_alpaca_json_is_one_array_of_the_three_fields(exported):
    _, _, files, rows = exported
    text = files["alpaca-json"].read_text(encoding="utf-8")
    assert text.startswith("[") and text.rstrip().endswith("]")
    data = json.loads(text)
    assert all(set(item) == set(ALPACA_FIELDS) for item in data)
    assert any("fatigué" in item["input"] for item in data)  # non-ASCII text survives as written
    assert any(r["origin"] == "merged" for r in rows)


def test_export_is_deterministic_and_leaves_no_parts(exported):
    store, out, files, _ = exported
    again = Path(export_final(store, out / "again.jsonl", "jsonl").local)
    assert again.read_bytes() == files["jsonl"].read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(["again.jsonl", *(p.name for p in files.values())])


def test_empty_final_exports_valid_files(exported, store, tmp_path):
    source, _, _, _ = exported
    store.write(source.read("final").limit(0), "final")
    for fmt in FORMATS:
        path = Path(export_final(store, tmp_path / f"empty.{SUFFIX[fmt]}", fmt).local)
        assert _plain_read(path, fmt) == []


def test_bad_requests_fail_clearly(exported, tmp_path):
    store, _, _, _ = exported
    with pytest.raises(ExportError, match="unknown export format"):
        export_final(store, tmp_path / "x.csv", "csv")
    with pytest.raises(ExportError, match="no column"):
        export_final(store, tmp_path / "x.jsonl", "jsonl", fields=["instruction", "quality"])
