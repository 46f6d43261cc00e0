"""Independent expectations for the ingest tests: plain Python json, no Spark, no ingest code.

The tests compare what ingest produced with what these helpers predict from the raw files, so a
bug in the stage's parser cannot hide behind the same bug in the expectation.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEP = "\x1f"
DEPTHS = (99, 100, 101, 400, 600, 800, 1200, 3000)  # around ingest.max_depth's default, and far past it


def nested_json(depth: int, leaf: str = "1", kinds: str = "[{", noisy: bool = False) -> str:
    """JSON text nesting ``depth`` arrays/objects (the outermost counts one) around ``leaf``,
    written by hand: ``json.dumps`` itself recurses. The containers are taken in turn from
    ``kinds``. ``noisy`` puts a string of brackets, escaped quotes and backslashes at every
    level, so only a depth count that skips strings gets the depth right."""
    opening, closing = [], []
    for level in range(depth):
        array = kinds[level % len(kinds)] == "["
        if noisy:
            opening.append('["]\\\\", ' if array else '{"k\\"[": "}", "v": ')
        else:
            opening.append("[" if array else '{"k":')
        closing.append("]" if array else "}")
    return "".join(opening) + leaf + "".join(reversed(closing))


def norm(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def expected_id(instruction: str, input_: str, output: str, length: int = 32) -> str:
    """The content hash, computed here from its definition rather than through ingest."""
    return hashlib.sha256(SEP.join((instruction, input_, output)).encode("utf-8")).hexdigest()[:length]


def alpaca_triple(obj: Any) -> tuple[str, str, str] | None:
    """Normalised (instruction, input, output) of a valid Alpaca object, else None."""
    if not isinstance(obj, dict):
        return None
    instruction, input_, output = obj.get("instruction"), obj.get("input"), obj.get("output")
    if input_ is None:
        input_ = ""
    if not all(isinstance(v, str) for v in (instruction, input_, output)):
        return None
    triple = (norm(instruction), norm(input_), norm(output))
    if not triple[0] or not triple[2]:
        return None
    return triple


@dataclass
class Expectation:
    """What a file should turn into: the ids kept, the number of rows, duplicates and other rejects."""
    rows: int = 0
    kept_ids: list[str] = field(default_factory=list)   # first occurrence order
    duplicates: int = 0
    invalid: int = 0

    def add(self, triple: tuple[str, str, str] | None) -> None:
        self.rows += 1
        if triple is None:
            self.invalid += 1
            return
        rid = expected_id(*triple)
        if rid in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(rid)
            self.kept_ids.append(rid)

    def __post_init__(self) -> None:
        self._seen: set[str] = set()

    @property
    def records(self) -> int:
        return len(self.kept_ids)

    @property
    def rejects(self) -> int:
        return self.duplicates + self.invalid


def expect_alpaca_array(path: Path) -> Expectation:
    exp = Expectation()
    for obj in json.loads(path.read_text(encoding="utf-8")):
        exp.add(alpaca_triple(obj))
    return exp


def expect_seed_tasks(path: Path) -> Expectation:
    """Seed tasks: one unit per instance (instruction from the task, input/output from the instance)."""
    exp = Expectation()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        for instance in task["instances"]:
            exp.add(alpaca_triple({"instruction": task["instruction"], **instance}))
    return exp


def expect_jsonl(path: Path) -> tuple[Expectation, list[int]]:
    """Alpaca JSON Lines: the expectation and the 1-based line numbers that must be rejected."""
    exp = Expectation()
    rejected_lines = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            triple = alpaca_triple(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            triple = None
        before = exp.rejects
        exp.add(triple)
        if exp.rejects > before:
            rejected_lines.append(number)
    return exp, rejected_lines


# ---------------------------------------------------------------------------------------------
# A corpus of broken lines mixed with valid ones
# ---------------------------------------------------------------------------------------------

WORDS = ("river mountain bread engine violin quantum harbour lantern orbit meadow cipher glacier "
         "pepper signal theorem canvas falcon ember prism tundra").split()


@dataclass
class FuzzLine:
    data: bytes
    valid: bool              # lands in records (first occurrence of its content)
    reason: str | None       # the reason code expected when it is rejected


def fuzz_corpus(seed: int, valid_lines: int, broken_lines: int, max_line_bytes: int) -> list[FuzzLine]:
    """Valid Alpaca lines (unique content) shuffled with every kind of broken line we can think of."""
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    lines: list[FuzzLine] = []
    for i in range(valid_lines):
        obj = {"instruction": f"{sentence(6)} ({i})", "output": sentence(12)}
        if rng.random() < 0.5:
            obj["input"] = sentence(4)
        if rng.random() < 0.2:
            obj["input"] = None
        if rng.random() < 0.2:
            obj["quality_score"] = rng.random()
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.05:  # meta nested up to the depth limit (99 or 100 deep in all): kept
            text = text[:-1] + ', "meta": ' + nested_json(rng.choice((99, 100)) - 1) + "}"
        lines.append(FuzzLine(text.encode(), True, None))

    def deep(field: str, depth: int) -> bytes:
        """An Alpaca line nesting ``depth`` deep in all through ``field``."""
        fields = {"instruction": '"Deep?"', "output": '"Yes."', field: nested_json(depth - 1)}
        return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()

    good = json.dumps({"instruction": "Name a colour.", "output": "Blue."})
    makers = [
        lambda: (good[: rng.randint(1, len(good) - 2)].encode(), "malformed_json"),     # truncated
        lambda: (b'{"instruction": "x", "output": "y",}', "malformed_json"),               # trailing comma
        lambda: (b"{'instruction': 'x', 'output': 'y'}", "malformed_json"),                # python repr
        lambda: (b"[" * 5000 + b"]" * 5000, "too_deep"),
        lambda: (b"[" * 5000, "too_deep"),                                                 # and cut short
        lambda: (deep("meta", rng.choice([d for d in DEPTHS if d > 100])), "too_deep"),   # in an extra field
        lambda: (deep("instruction", d := rng.choice(DEPTHS)), "too_deep" if d > 100 else "non_string_field"),
        lambda: (b'{"instruction": "n", "output": ' + b"9" * 5000 + b"}", "malformed_json"),  # huge int
        lambda: (b'{"instruction": "n", "output": "y", "meta": {"n": 1' + b"0" * 5000 + b"}}", "malformed_json"),
        lambda: (b'{"instruction": "caf\xe9", "output": "ok"}', "invalid_utf8"),           # latin-1 byte
        lambda: (b'{"instruction": "\xff\xfe", "output": "ok"}', "invalid_utf8"),
        lambda: (b'{"instruction": "\\ud800 lone", "output": "ok"}', "invalid_utf8"),      # escaped surrogate
        lambda: (b'{"messages": [{"role": "user", "content": "hi"}, '
                 b'{"role": "assistant", "content": "\\udc00\\ud800"}]}', "invalid_utf8"),    # reversed pair
        lambda: (b"null", "not_an_object"),
        lambda: (b"[1, 2, 3]", "not_an_object"),
        lambda: (b'"just a string"', "not_an_object"),
        lambda: (b"42", "not_an_object"),
        lambda: (b"true", "not_an_object"),
        lambda: (b'{"prompt": "x", "completion": "y"}', "unknown_layout"),
        lambda: (b"{}", "unknown_layout"),
        lambda: (b'{"output": "y"}', "missing_instruction"),
        lambda: (b'{"instruction": null, "output": "y"}', "missing_instruction"),
        lambda: (b'{"instruction": "x"}', "missing_output"),
        lambda: (b'{"instruction": "x", "output": null}', "missing_output"),
        lambda: (b'{"instruction": 7, "output": "y"}', "non_string_field"),
        lambda: (b'{"instruction": "x", "output": ["a", "b"]}', "non_string_field"),
        lambda: (b'{"instruction": "x", "input": 3.5, "output": "y"}', "non_string_field"),
        lambda: (b'{"instruction": "x", "output": {"text": "y"}}', "non_string_field"),
        lambda: (b'{"instruction": "x", "output": false}', "non_string_field"),
        lambda: (b'{"instruction": "  \\n ", "output": "y"}', "empty_text"),
        lambda: (b'{"instruction": "x", "output": ""}', "empty_text"),
        lambda: (json.dumps({"instruction": "big", "output": "z" * (max_line_bytes + 10)}).encode(), "too_large"),
        lambda: (b'{"conversations": "not a list"}', "bad_conversation"),
        lambda: (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_output"),
        lambda: (b'{"instruction": "seed", "instances": []}', "missing_output"),
        lambda: (b'{"instruction": "seed", "instances": 5}', "unknown_layout"),
        lambda: (bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))) + b"\x80", "invalid_utf8"),
    ]
    for _ in range(broken_lines):
        data, reason = rng.choice(makers)()
        # a raw CR or LF would end the line early: Spark's text reader splits on both
        lines.append(FuzzLine(data.replace(b"\n", b" ").replace(b"\r", b" "), False, reason))
    rng.shuffle(lines)
    # blank lines are separators, not rows; they must not disturb the line numbers of the others
    for _ in range(max(1, broken_lines // 10)):
        lines.insert(rng.randrange(len(lines) + 1), FuzzLine(rng.choice([b"", b"   ", b"\t"]), False, "blank"))
    return lines


# ---------------------------------------------------------------------------------------------
# A big JSON array made from the real records, with planted duplicates and broken elements
# ---------------------------------------------------------------------------------------------

@dataclass
class BigArray:
    """What a generated array holds, known from how it was written (no parsing involved)."""
    path: Path
    bytes: int = 0
    rows: int = 0
    records: int = 0
    rejected: dict[int, str] = field(default_factory=dict)   # element number -> reason code


def _real_triples(shared_data: Path) -> list[tuple[str, str, str]]:
    triples = []
    for name in ("mergeit-6k.json", "gpteacher-roleplay.json", "gpteacher-toolformer.json"):
        triples.extend(t for t in map(alpaca_triple, json.loads((shared_data / name).read_text("utf-8"))) if t)
    return triples


def write_big_array(shared_data: Path, path: Path, target_bytes: int, broken: bool = True) -> BigArray:
    """An Alpaca JSON array of at least ``target_bytes`` from the shared data's records, each
    edited to be unique (a variant number in the instruction, the next record's output appended),
    with an exact copy of the previous element every 10,007 elements and, every 100,003 when
    ``broken``, one malformed element and one without an output."""
    base = _real_triples(shared_data)
    big = BigArray(path)
    previous = None
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        while big.bytes < target_bytes:
            row, phase = big.rows, big.rows % 100_003 if broken else -1
            if phase == 50_000:
                text, reason = '{"instruction": "Broken element", "output": tru}', "malformed_json"
            elif phase == 70_000:
                text, reason = json.dumps({"instruction": f"No output here ({row})"}), "missing_output"
            elif row % 10_007 == 5 and previous is not None:
                text, reason = previous, "exact_duplicate"
            else:
                instruction, input_, output = base[row % len(base)]
                text, reason = json.dumps({"instruction": f"{instruction} (variant {row})", "input": input_,
                                           "output": output + "\n\n" + base[(row + 1) % len(base)][2]},
                                          ensure_ascii=row % 2 == 0), None
            previous = text if reason is None else None
            if reason:
                big.rejected[row] = reason
            else:
                big.records += 1
            chunk = (",\n" if row else "") + text
            out.write(chunk)
            big.bytes += len(chunk.encode("utf-8"))
            big.rows += 1
        out.write("\n]\n")
    big.bytes = path.stat().st_size
    return big
