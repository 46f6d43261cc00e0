"""The bundled LLM server's build: llama.cpp compiled without ggml's AMX kernels (which crash on the
first request on AMX CPUs, see docs/DESIGN.md), on whatever x86-64 CPU installed it."""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from mergeit_spark.llm.server import LLMServerError, llama_system_info, refuse_amx_build

AMX_MNEMONICS = ("ldtilecfg", "tileloadd", "tdpbssd", "tdpbusd", "tdpbf16ps", "tilestored")

x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is x86-64 only")


def ggml_cpu_libraries() -> list[Path]:
    import llama_cpp
    return sorted(Path(llama_cpp.__file__).parent.rglob("libggml-cpu*.so*"))


@x86_only
def test_llama_cpp_reports_no_amx_kernels():
    info = llama_system_info()
    assert "AVX2 = 1" in info        # the real system-info line, read from the installed build
    assert "AMX_INT8 = 1" not in info
    refuse_amx_build()               # the server's own guard lets this build start


@x86_only
def test_ggml_cpu_library_holds_no_amx_instruction():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the built library"
    libraries = ggml_cpu_libraries()
    assert libraries, "llama-cpp-python ships no libggml-cpu"
    for library in libraries:
        text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                              text=True, check=True).stdout
        assert "vfmadd" in text or "vpdpbusd" in text     # the disassembly is real code
        found = sorted({m for m in AMX_MNEMONICS if f"\t{m}" in text or f" {m} " in text})
        assert not found, f"{library.name} holds AMX instructions: {found}"


def test_a_build_with_amx_kernels_is_refused(monkeypatch):
    from mergeit_spark.llm import server
    monkeypatch.setattr(server, "llama_system_info", lambda: "CPU : AVX2 = 1 | AMX_INT8 = 1 | ")
    with pytest.raises(LLMServerError, match="-mno-amx-int8"):
        server.refuse_amx_build()
