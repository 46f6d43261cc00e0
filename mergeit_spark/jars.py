"""JVM packages for the session, the way Spark users get them, configured in one place.

``spark.packages`` (Maven coordinates) are resolved by Spark's own Ivy at session start
(``spark.jars.packages``) and cached under ``spark.ivy_dir``; ``spark.jars`` (jar files or folders)
go on the classpath as they are, the air-gapped route. Two names stand for coordinates derived
from what is installed, so they are never written down twice: ``delta`` (what delta-spark's
``configure_spark_with_delta_pip`` picks for the installed pyspark) and ``spark-nlp`` (what Spark
NLP's resolver picks). Ivy reads a settings file written here that lists ``spark.repositories``
and nothing else (``hadoop-aws`` too: Hadoop's s3a connector, in the version of the Hadoop that
pyspark bundles, added by the pipeline itself when a path is on S3). Spark's built-in chain also consults ``~/.m2``, and a ~/.m2 holding poms without
their jars (what a failed ``mvn dependency:get`` leaves) makes Ivy fail on jars Maven Central has.

``python -m mergeit_spark.jars fetch DEST`` resolves the packages once and copies every jar into
DEST: the folder an air-gapped machine points ``spark.jars`` at.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from xml.sax.saxutils import quoteattr

from .config import SparkSettings

DELTA = "delta"
SPARK_NLP = "spark-nlp"
HADOOP_AWS = "hadoop-aws"
# What Ivy prints when it cannot resolve or download something.
_IVY_FAILURE = re.compile(r"download failed|unresolved dependency|not found|UNRESOLVED|"
                          r"FAILED|Server access error|ERROR", re.IGNORECASE)


class JarsError(RuntimeError):
    """A package or jar the settings name cannot be had; the message names the setting."""


def delta_coordinate() -> str:
    """Delta Lake's coordinate for the installed pyspark, as delta-spark's own helper derives it."""
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = configure_spark_with_delta_pip(SparkSession.Builder())
    return builder._options["spark.jars.packages"]  # noqa: SLF001 - the one place it is computed


def spark_nlp_coordinate() -> str:
    """Spark NLP's coordinate for the installed pyspark and spark-nlp (CPU build)."""
    import pyspark
    import sparknlp

    try:  # spark-nlp >= 6.2 ships the resolver that sparknlp.start() uses
        from sparknlp._maven import resolve_spark_nlp_coordinate
    except ImportError:  # older releases: Spark 3 only, Scala 2.12 (what their start() hard-codes)
        return f"com.johnsnowlabs.nlp:spark-nlp_2.12:{sparknlp.version()}"
    return resolve_spark_nlp_coordinate(pyspark.__version__, sparknlp.version())


def hadoop_aws_coordinate() -> str:
    """Hadoop's s3a connector in the version of the Hadoop client inside the installed pyspark
    (the two must match; its AWS SDK bundle comes with it)."""
    from pyspark.find_spark_home import _find_spark_home

    found = sorted(Path(_find_spark_home(), "jars").glob("hadoop-client-api-*.jar"))
    if not found:
        raise JarsError("pyspark bundles no hadoop-client-api jar: name org.apache.hadoop:hadoop-aws:<your "
                        "Hadoop version> in spark.packages")
    return f"org.apache.hadoop:hadoop-aws:{found[-1].name[len('hadoop-client-api-'):-len('.jar')]}"


def package_coordinates(settings: SparkSettings) -> list[str]:
    """``spark.packages`` with the names ``delta``, ``spark-nlp`` and ``hadoop-aws`` replaced by
    coordinates."""
    named = {DELTA: delta_coordinate, SPARK_NLP: spark_nlp_coordinate, HADOOP_AWS: hadoop_aws_coordinate}
    return [named[p]() if p in named else p for p in settings.packages]


def jar_files(settings: SparkSettings) -> list[str]:
    """Every jar ``spark.jars`` names (folders expanded), checked to exist."""
    files: list[str] = []
    for entry in settings.jars:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(str(p.absolute()) for p in path.glob("*.jar"))
            if not found:
                raise JarsError(f"spark.jars: the folder {path} holds no .jar files")
            files += found
        elif path.is_file():
            files.append(str(path.absolute()))
        else:
            raise JarsError(f"spark.jars: {path} does not exist (a jar file or a folder of jars)")
    return files


def ivy_settings_file(settings: SparkSettings) -> Path:
    """Write (if changed) and return the Ivy settings listing ``spark.repositories`` only."""
    if not settings.repositories:
        raise JarsError("spark.repositories is empty: Ivy needs at least one Maven repository")
    resolvers = "\n".join(
        f'      <ibiblio name="repo-{i}" m2compatible="true" root={quoteattr(url)}/>'
        for i, url in enumerate(settings.repositories))
    text = ('<ivysettings>\n  <settings defaultResolver="mergeit"/>\n  <resolvers>\n'
            f'    <chain name="mergeit" returnFirst="true">\n{resolvers}\n    </chain>\n'
            '  </resolvers>\n</ivysettings>\n')
    path = Path(settings.ivy_dir).expanduser() / "mergeit-ivysettings.xml"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a concurrent session never reads half a file
    return path


def jar_conf(settings: SparkSettings) -> dict[str, str]:
    """The ``spark.jars*`` configuration for a session this tool starts itself."""
    conf: dict[str, str] = {}
    files = jar_files(settings)
    if files:
        conf["spark.jars"] = ",".join(files)
    coordinates = package_coordinates(settings)
    if coordinates:
        conf["spark.jars.packages"] = ",".join(coordinates)
        conf["spark.jars.ivy"] = str(Path(settings.ivy_dir).expanduser())
        conf["spark.jars.ivySettings"] = str(ivy_settings_file(settings))
        if settings.jars_excludes:
            conf["spark.jars.excludes"] = ",".join(settings.jars_excludes)
    return conf


def provides_delta(settings: SparkSettings) -> bool:
    """Whether the packages or jars the settings name bring Delta Lake's classes."""
    named = " ".join(package_coordinates(settings) + [Path(j).name for j in jar_files(settings)])
    return "delta-spark" in named or "delta-core" in named


def resolution_failure(conf: dict[str, str]) -> str | None:
    """Resolve ``conf``'s packages the way session start does, in a child spark-submit; Ivy's
    complaint when that fails, None when it succeeds. Used to explain a session that did not start."""
    from pyspark.find_spark_home import _find_spark_home

    args = [arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")]
    with tempfile.TemporaryDirectory() as tmp:
        noop = Path(tmp) / "noop.py"
        noop.write_text("")
        cmd = [str(Path(_find_spark_home()) / "bin" / "spark-submit"), "--master", "local[1]", *args, str(noop)]
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode == 0:
        return None
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if _IVY_FAILURE.search(ln)]
    return "\n".join(dict.fromkeys(lines)) or (done.stderr.strip().splitlines() or ["(no output)"])[-1]


def fetch(settings: SparkSettings, dest: Path) -> list[Path]:
    """Resolve the packages once (a short local session) and copy every jar into ``dest``."""
    from .session import build_session

    spark = build_session(settings)
    try:
        uris = [u for u in (spark.conf.get("spark.jars", None) or "").split(",") if u]
    finally:
        spark.stop()
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for uri in uris:
        source = Path(urlparse(uri).path)
        copied.append(Path(shutil.copy2(source, dest / source.name)))
    return copied


def main(argv: list[str] | None = None) -> int:
    from .config import load_settings

    parser = argparse.ArgumentParser(prog="python -m mergeit_spark.jars", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["coordinates", "fetch"])
    parser.add_argument("dest", nargs="?", default="jars", help="fetch: the folder to fill")
    parser.add_argument("--conf", action="append", default=[], help="settings profile (YAML)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.key=value")
    args = parser.parse_args(argv)
    settings = load_settings(args.conf, args.overrides).spark
    if args.command == "coordinates":
        print("\n".join(package_coordinates(settings)))
        return 0
    for path in fetch(settings, Path(args.dest)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
