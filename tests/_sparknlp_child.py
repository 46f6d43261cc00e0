"""Child process of tests/test_sparknlp.py: the ``mergeit`` command of the venv it runs in (the
Spark NLP venv under ``make test``), ``run --until embed`` with the spark-nlp embed backend over the
reference rows (as a JSON Lines input, outputs included), so that the backend is run the way a user
runs it: ingest, then embed inside the JVM, every table under the given root. Its own JVM: a test
session already running elsewhere cannot take new jars.

``python tests/_sparknlp_child.py ROWS ROOT [--set section.key=value ...]``; exits with the
command's exit code.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _sparknlp_reference import real_rows


def main(rows: int, root: str, sets: list[str]) -> int:
    data = Path(root).parent / "reference-input.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                            for r in real_rows(rows, with_output=True)))
    command = Path(sys.executable).parent / "mergeit"  # the venv's console script
    return subprocess.run([str(command), "run", "--until", "embed", "--set", f"input.paths=[{data}]",
                           "--set", f"output.root={root}", "--set", "tables.engine=delta-rs", *sets],
                          check=False).returncode


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
