"""Python workers re-read a zip archive's directory on import-cache invalidation only when the
archive changed (mergeit_spark.worker_imports)."""
from __future__ import annotations

import importlib.util
import sys
import zipfile
import zipimport

import pytest

from mergeit_spark import worker_imports


def _zip(path, modules: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in modules.items():
            archive.writestr(f"{name}.py", source)


@pytest.fixture()
def counted_reads(monkeypatch):
    reads: list[str] = []
    eager_read = zipimport._read_directory

    def read(archive):
        reads.append(archive)
        return eager_read(archive)

    monkeypatch.setattr(zipimport, "_read_directory", read)
    return reads


def test_an_unchanged_archive_is_not_read_again_and_a_rewritten_one_is(tmp_path, counted_reads):
    archive = tmp_path / "lib.zip"
    _zip(archive, {"alpha_mod": "VALUE = 1\n"})
    importer = zipimport.zipimporter(str(archive))
    assert importer.find_spec("alpha_mod") is not None
    counted_reads.clear()

    for _ in range(3):
        worker_imports.invalidate_when_changed(importer)
    assert len(counted_reads) == 1  # the first call has no recorded read to compare with
    assert importer.find_spec("alpha_mod") is not None

    _zip(archive, {"alpha_mod": "VALUE = 1\n", "beta_mod": "VALUE = 2\n"})  # new size and mtime
    assert importer.find_spec("beta_mod") is None  # the directory read before does not list it
    worker_imports.invalidate_when_changed(importer)
    assert len(counted_reads) == 2
    spec = importer.find_spec("beta_mod")
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VALUE == 2


def test_a_vanished_archive_is_invalidated_as_python_does(tmp_path):
    archive = tmp_path / "gone.zip"
    _zip(archive, {"gamma_mod": "VALUE = 3\n"})
    importer = zipimport.zipimporter(str(archive))
    worker_imports.invalidate_when_changed(importer)
    archive.unlink()
    worker_imports.invalidate_when_changed(importer)
    assert importer.find_spec("gamma_mod") is None


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python 3.13+ invalidates zip caches lazily itself")
def test_spark_python_workers_run_with_it_and_the_driver_without(spark):
    assert not worker_imports.installed()  # the driver's interpreter is left alone
    per_task = (spark.sparkContext.parallelize(range(4), 4)
                .map(lambda _: worker_imports.installed()).collect())
    assert per_task == [True] * 4
