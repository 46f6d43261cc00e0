"""Jars for the session from one place (the spark settings): Delta's coordinate derived from what is
installed, Ivy settings that ignore ~/.m2, clear errors naming the setting, and the air-gapped
route (fetch the jars into a folder, then start with that folder and no resolution at all)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path
from xml.etree import ElementTree

import pyspark
import pytest
from deltalake import DeltaTable

from mergeit_spark.config import load_settings
from mergeit_spark.jars import JarsError, delta_coordinate, ivy_settings_file, jar_conf, jar_files
from mergeit_spark.session import DELTA_TABLE_DEFAULTS, has_delta

REPO = Path(__file__).resolve().parents[1]


def spark_settings(*overrides: str):
    return load_settings(overrides=list(overrides), env={}).spark


def run_child(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Python in a fresh process: a second Spark session cannot start in this one."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


def test_delta_coordinate_follows_the_installed_pyspark_and_delta_spark():
    major_minor = ".".join(pyspark.__version__.split(".")[:2])
    assert delta_coordinate() == f"io.delta:delta-spark_{major_minor}_2.13:{version('delta-spark')}"
    conf = jar_conf(spark_settings())
    assert conf["spark.jars.packages"] == delta_coordinate()


def test_ivy_asks_only_the_configured_repositories(tmp_path):
    settings = spark_settings(f"spark.ivy_dir={tmp_path}",
                              "spark.repositories=[https://mirror.example/maven2/,https://repo1.maven.org/maven2/]")
    conf = jar_conf(settings)
    assert conf["spark.jars.ivy"] == str(tmp_path)
    tree = ElementTree.parse(conf["spark.jars.ivySettings"])
    roots = [r.get("root") for r in tree.iter("ibiblio")]
    assert roots == ["https://mirror.example/maven2/", "https://repo1.maven.org/maven2/"]
    assert ".m2" not in Path(conf["spark.jars.ivySettings"]).read_text()
    assert ivy_settings_file(settings) == Path(conf["spark.jars.ivySettings"])  # rewritten only on change


def test_jars_that_are_not_there_are_errors_naming_spark_jars(tmp_path):
    with pytest.raises(JarsError, match=r"spark\.jars: .*nope.jar does not exist"):
        jar_files(spark_settings(f"spark.jars=[{tmp_path / 'nope.jar'}]"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JarsError, match=r"spark\.jars: the folder .*empty holds no \.jar files"):
        jar_files(spark_settings(f"spark.jars=[{tmp_path / 'empty'}]"))


def test_the_shared_session_carries_delta(spark):
    assert has_delta(spark)
    for key, value in DELTA_TABLE_DEFAULTS.items():
        assert spark.conf.get(key) == value


@pytest.mark.slow
def test_a_package_that_does_not_resolve_is_an_error_naming_the_setting(tmp_path):
    done = run_child(f"""
        from mergeit_spark.config import load_settings
        from mergeit_spark.session import build_session
        build_session(load_settings(overrides=["spark.master=local[1]", "spark.driver_memory=1g",
            "spark.ivy_dir={tmp_path}", "spark.packages=[io.delta:no-such-artifact_2.13:9.9.9]"], env={{}}).spark)
    """)
    assert done.returncode != 0
    final = done.stderr.rsplit("Traceback (most recent call last):", 1)[-1]  # what the user is left with
    error = final[final.find("mergeit_spark.jars.JarsError"):]
    assert error.startswith("mergeit_spark.jars.JarsError: Spark could not start: spark.packages"), final[-2000:]
    assert "io.delta#no-such-artifact_2.13;9.9.9: not found" in error and "spark.repositories" in error
    assert "Py4J" not in final and "JAVA_GATEWAY_EXITED" not in final


@pytest.mark.slow
def test_air_gapped_fetch_then_start_from_the_folder_alone(tmp_path):
    """`make jars` on a connected machine, then a session with no resolution at all: the folder,
    spark.packages=[] and an unreachable repository. Delta writes a table there."""
    folder = tmp_path / "jars"
    fetched = subprocess.run([sys.executable, "-m", "mergeit_spark.jars", "fetch", str(folder),
                              "--set", "spark.master=local[1]", "--set", "spark.driver_memory=1g"],
                             capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    group, artifact, rev = delta_coordinate().split(":")
    names = {p.name for p in folder.glob("*.jar")}  # Ivy's names: group_artifact-version.jar
    assert {f"{group}_{artifact}-{rev}.jar", f"io.delta_delta-storage-{rev}.jar"} <= names
    root = tmp_path / "run"
    done = run_child(f"""
        from mergeit_spark.config import load_settings
        from mergeit_spark.session import build_session
        from mergeit_spark.tables import TableStore
        spark = build_session(load_settings(overrides=["spark.master=local[1]", "spark.driver_memory=1g",
            "spark.packages=[]", "spark.jars=[{folder}]", "spark.repositories=[http://127.0.0.1:9/none/]"],
            env={{}}).spark)
        store = TableStore(spark, "{root}")
        print("engine", store.engine)
        store.write(spark.range(7), "t")
        spark.stop()
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine delta-spark" in done.stdout
    assert "Delta-Lake/" in DeltaTable(str(root / "t")).history()[0]["engineInfo"]
    assert DeltaTable(str(root / "t")).to_pyarrow_table().num_rows == 7
