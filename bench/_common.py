"""Shared by the benchmarks: write one section of BENCHMARKS.md with machine, command and date."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is rewritten by the benchmark named in it. Ratios compare runs made side by side in one process.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, {platform.system()}"


def write_section(name: str, body: str, ran_on: str | None = None, command: str | None = None) -> None:
    """Replace (or add) the section ``name`` of BENCHMARKS.md. ``ran_on`` and ``command`` name
    another machine and its command where the numbers were taken elsewhere (a lent device)."""
    command = command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    stamp = _dt.date.today().isoformat()
    section = (f"<!-- bench:{name} -->\n## {name}\n\n- machine: {ran_on or machine()}\n- command: `{command}`\n"
               f"- date: {stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->\n")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)
