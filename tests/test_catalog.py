"""Stage tables as catalog tables (``output.catalog`` / ``output.schema``): every table the
executor writes is an external Delta table of the session's catalog at ``<root>/<table>``, so
``SELECT * FROM <schema>.<table>`` reads what the run wrote, increments included. A Hive-compatible
metastore that a second session opens: tests/test_s3.py's whole-pipeline run."""
from __future__ import annotations

import uuid

import pytest

from _toy_stages import NEW, ROWS, Double, Source
from mergeit_spark.config import load_settings
from mergeit_spark.pipeline import Pipeline


def _pipeline(spark, root, schema, *overrides):
    settings = load_settings(overrides=[f"output.root={root}", f"output.schema={schema}", *overrides], env={})
    return Pipeline(settings, spark=spark, stages=[Source(), Double()])


def test_every_stage_table_is_a_catalog_table_that_follows_the_run(spark, tmp_path):
    schema = f"curation_{uuid.uuid4().hex[:8]}"
    pipeline = _pipeline(spark, tmp_path / "run", schema)
    pipeline.run()
    tables = {t.name for t in spark.catalog.listTables(schema)}
    assert tables == {"numbers", "doubled"}
    assert spark.sql(f"SELECT count(*) FROM {schema}.numbers").first()[0] == ROWS
    described = {r["col_name"]: r["data_type"] for r in spark.sql(f"DESCRIBE TABLE EXTENDED {schema}.numbers").collect()}
    assert described["Type"] == "EXTERNAL" and described["Location"].endswith(f"{tmp_path}/run/numbers")
    pipeline.extend()  # an increment appends: the catalog table is the Delta table, so it sees it
    assert spark.sql(f"SELECT count(*) FROM {schema}.numbers").first()[0] == ROWS + NEW
    assert spark.sql(f"SELECT max(n) FROM {schema}.doubled").first()[0] == 2 * (ROWS + NEW - 1)

    other = _pipeline(spark, tmp_path / "elsewhere", schema)
    with pytest.raises(RuntimeError, match=f"`{schema}`.`numbers` is at .*run/numbers, not at this run root"):
        other.run()  # the catalog's readers would silently read the other root
    spark.sql(f"DROP SCHEMA {schema} CASCADE")
    assert (tmp_path / "run" / "numbers" / "_delta_log").is_dir()  # external: dropping keeps the files
