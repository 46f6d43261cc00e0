"""The reference for the spark-nlp embed backend: real rows and their sentence-transformers vectors.

Run where torch is (the main venv): ``python tests/_sparknlp_reference.py OUT.parquet [ROWS]``.
Writes ``id, instruction, input, text, embedding`` for the first ROWS distinct records of
``../shared/data/mergeit-6k.json``, embedded by embed.py's own encoder (``models.encode_texts`` at
fp32) on the text embed.py builds (``record_texts``). tests/test_sparknlp.py and bench/bench_sparknlp.py compare
Spark NLP's vectors with these.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mergeit-6k.json"


def real_rows(rows: int, with_output: bool = False) -> list[dict]:
    from mergeit_spark.ids import content_id

    seen, picked = set(), []
    for r in json.loads(DATA.read_text()):
        rid = content_id(r["instruction"], r["input"], r["output"])
        if rid not in seen:
            seen.add(rid)
            picked.append({"id": rid, "instruction": r["instruction"], "input": r["input"],
                           **({"output": r["output"]} if with_output else {})})
        if len(picked) == rows:
            break
    return picked


def write_reference(dest: Path, rows: int = 300) -> Path:
    from mergeit_spark.config import load_settings
    from mergeit_spark.models import encode_texts
    from mergeit_spark.stages.embed import record_texts

    settings = replace(load_settings(env={}).embed, precision="fp32")
    table = pa.Table.from_pylist(real_rows(rows))
    texts = record_texts(table.column("instruction").combine_chunks(), table.column("input").combine_chunks())
    vectors = encode_texts(texts.to_pylist(), settings)
    table = table.append_column("text", texts).append_column(
        "embedding", pa.array(vectors.tolist(), type=pa.list_(pa.float32())))
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest)
    return dest


if __name__ == "__main__":
    print(write_reference(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300))
