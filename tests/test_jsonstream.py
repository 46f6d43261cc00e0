"""The streaming JSON framer and its independent unit count (no Spark: plain files and bytes)."""
from __future__ import annotations

import io
import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from _ingest_helpers import DEPTHS, nested_json
from mergeit_spark.jsonstream import RECURSION_DETAIL, JsonFramer, count_units, nests_deeper_than


def frame(data: bytes, chunk_bytes: int = 1 << 20, max_bytes: int = 10_000, keep_chars: int = 20):
    framer = JsonFramer(io.BytesIO(data), max_bytes, keep_chars, chunk_bytes)
    return [(e.row, e.text, e.size, e.value if e.parsed else None, e.problem) for e in framer.elements()]


def frame_with_depth(data: bytes, max_depth: int, chunk_bytes: int = 1 << 20):
    """(row, parsed, too_deep) of each element framed with a depth limit."""
    framer = JsonFramer(io.BytesIO(data), 10 ** 7, 20, chunk_bytes, max_depth=max_depth)
    return [(e.row, e.parsed, e.too_deep) for e in framer.elements()]


def shape(elements):
    """What must not depend on where the chunks end: rows, sizes, parsed or not, problems."""
    return [(row, size, value, problem) for row, _, size, value, problem in elements]


CASES = {
    b"[]": [],
    b" \xef\xbb\xbf [ ] \n": [],
    b"": [],
    b"[1, 2, 3]": [(0, "1", 1, 1, None), (1, "2", 1, 2, None), (2, "3", 1, 3, None)],
    b'[{"a": [1, {"b": "x,]"}]}, "s\\"]"]': [(0, '{"a": [1, {"b": "x,]"}]}', 24, {"a": [1, {"b": "x,]"}]}, None),
                                             (1, '"s\\"]"', 6, 's"]', None)],
    b"[1,]": [(0, "1", 1, 1, None), (1, "", 0, None, "no value before ']'")],
    b"[,1]": [(0, "", 0, None, "no value before ','"), (1, "1", 1, 1, None)],
    b"[1 2]": [(0, "1 2", 3, None, "extra data after the value at char 1")],
    b'[{"a": tru}, 5]': [(0, '{"a": tru}', 10, None, "Expecting value at char 6"), (1, "5", 1, 5, None)],
    b"[1, 2": [(0, "1", 1, 1, None), (1, "2", 1, 2, None), (2, "", 0, None, "array not closed (the file ends)")],
    b"[1,": [(0, "1", 1, 1, None), (1, "", 0, None, "array not closed (the file ends)")],
    b"[": [(0, "", 0, None, "array not closed (the file ends)")],
    b'[{"a": "cut': [(0, '{"a": "cut', 10, None, "the file ends inside this element (array not closed)")],
    b"[1] junk": [(0, "1", 1, 1, None), (1, "junk", 4, None, "data after the closing ]")],
    b'{"a":1}\n{"b":2} 7': [(0, '{"a":1}', 7, {"a": 1}, None), (1, '{"b":2}', 7, {"b": 2}, None), (2, "7", 1, 7, None)],
    b'{"a":1}}{"b":2}': [(0, '{"a":1}', 7, {"a": 1}, None), (1, "}", 1, None, "Expecting value at char 0"),
                         (2, '{"b":2}', 7, {"b": 2}, None)],
    b'["caf\xc3\xa9", "caf\xe9"]': [(0, '"caf\u00e9"', 7, "caf\u00e9", None), (1, '"caf\udce9"', 6, "caf\udce9", None)],
    b'["a\\\\", "b\\""]': [(0, '"a\\\\"', 5, "a\\", None), (1, '"b\\""', 5, 'b"', None)],
}


@pytest.mark.parametrize("data", list(CASES), ids=[repr(c[:24]) for c in CASES])
def test_framing_rules(data):
    assert frame(data) == CASES[data]
    # Where the chunks end changes nothing (a 3-byte chunk cuts every string, number and escape).
    for chunk in (1, 2, 3, 7):
        assert shape(frame(data, chunk)) == shape(CASES[data])


def test_deep_nesting_and_oversize_elements():
    [deep] = frame(b"[" + b"[" * 5000)
    assert deep[4] == "the file ends inside this element (array not closed)" and deep[2] == 5000
    [nested, after] = frame(b"[" + b"[" * 5000 + b"]" * 5000 + b", 1]")  # no limit: json's own guard
    assert nested[4] == RECURSION_DETAIL and after[3] == 1
    big = b'"' + b"x" * 50_000 + b'"'
    for chunk in (1 << 20, 1000):  # whole in the window, or dropped while scanning
        [oversize, after] = frame(b"[" + big + b", 1]", chunk)
        assert oversize[2] == len(big) and oversize[4] is None and after[3] == 1  # the size decides
        if chunk < len(big):  # not held whole: a prefix is all that is left of it
            assert oversize[1] == big[:20].decode() and oversize[3] is None


def test_nesting_depth_is_measured_outside_strings():
    for depth in (1, 2, 5, 99, 100, 101, 1200):
        for kinds in ("[", "{", "[{", "{{["):
            text = nested_json(depth, kinds=kinds, noisy=True)
            if depth <= 500:  # valid JSON (as deep as json itself goes)
                json.loads(text)
            assert not nests_deeper_than(text, depth) and nests_deeper_than(text, depth - 1), (depth, kinds)
    assert not nests_deeper_than('"[[[[["', 0) and not nests_deeper_than("  7", 0)
    assert nests_deeper_than("  [[[", 2)  # a value cut short counts as far as it goes
    assert not nests_deeper_than('[1] [[[[', 1)  # the value ends at its closing bracket
    assert not nests_deeper_than('["unclosed [[[[', 1)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_elements_past_the_depth_limit_are_framed_not_decoded(depth, chunk):
    """An element nested past ``max_depth`` is one unit marked too deep (never decoded); the
    elements around it parse, keep their rows, and the count agrees."""
    deep = '{"instruction": "x", "meta": ' + nested_json(depth - 1, noisy=True) + "}"
    data = ('[{"a": 1}, ' + deep + ', "after"]').encode()
    too_deep = depth > 100
    assert frame_with_depth(data, 100, chunk) == [(0, True, False), (1, not too_deep, too_deep), (2, True, False)]
    stream = ('{"a": 1} ' + deep + ' "after"').encode()  # a stream of values: the same
    assert frame_with_depth(stream, 100, chunk) == [(0, True, False), (1, not too_deep, too_deep), (2, True, False)]


def test_ijson_count_is_flat_on_deep_elements(tmp_path):
    """Counting reads ijson's bare events: an element 20,000 deep is counted as one holding a few
    MB (ijson's ``items`` builds it and a path prefix per event: a gigabyte here, and past 100,000
    levels a worker killed for memory), with the framer's count agreeing."""
    path = tmp_path / "deep.json"
    data = b"[" + b"[" * 20_000 + b"]" * 20_000 + b', {"a": [1, {"b": 2}]}, 3]'
    path.write_bytes(data)
    tracemalloc.start()
    try:
        assert count_units(str(path), 10 ** 7, 20, max_depth=100) == 3
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak
    assert len(frame_with_depth(data, 100)) == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=8), st.booleans(), st.integers(1, 9))
def test_valid_arrays_frame_to_their_elements(tmp_path_factory, values, ascii_only, chunk):
    """On valid JSON the framer, JSON's grammar and ijson agree: one unit per element."""
    data = json.dumps(values, ensure_ascii=ascii_only, indent=None if chunk % 2 else 1).encode(
        "utf-8", "surrogatepass")
    elements = frame(data, chunk, max_bytes=10 ** 6)
    assert [e[0] for e in elements] == list(range(len(values)))
    if all(e[4] is None for e in elements):  # lone surrogates aside, every element parses back
        assert [e[3] for e in elements] == values
    path = tmp_path_factory.mktemp("arrays") / "a.json"
    path.write_bytes(data)
    assert count_units(str(path), 10 ** 6, 20) == len(values)


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=5), st.integers(0, 5), st.sampled_from(DEPTHS) | st.integers(1, 1500),
       st.sampled_from(["[", "{", "[{", "{["]), st.integers(1, 9))
def test_deep_elements_cost_only_themselves(tmp_path_factory, values, where, depth, kinds, chunk):
    """A deep element anywhere in a valid array: too deep past the limit (never decoded), else
    parsed back whole; every other element parses; ijson, the framer and JSON agree on the count."""
    texts = [json.dumps(v) for v in values]
    where = min(where, len(texts))
    texts.insert(where, nested_json(depth, kinds=kinds, noisy=True))
    data = ("[" + ", ".join(texts) + "]").encode("utf-8", "surrogatepass")
    elements = frame_with_depth(data, 100, chunk)
    assert [row for row, _, _ in elements] == list(range(len(texts)))
    assert [deep for _, _, deep in elements] == [i == where and depth > 100 for i in range(len(texts))]
    assert [parsed for _, parsed, _ in elements] == [i != where or depth <= 100 for i in range(len(texts))]
    path = tmp_path_factory.mktemp("deep") / "a.json"
    path.write_bytes(data)
    assert count_units(str(path), 10 ** 7, 20, max_depth=100) == len(texts)


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.integers(1, 5))
def test_count_matches_the_framer_on_any_bytes(tmp_path_factory, tail, chunk):
    """The independent count (ijson, else framing) equals the units the parser will see."""
    data = b'[{"instruction": "a", "output": "b"}, ' + tail
    path = tmp_path_factory.mktemp("bytes") / "b.json"
    path.write_bytes(data)
    assert count_units(str(path), 10 ** 6, 20) == len(frame(data, chunk, max_bytes=10 ** 6))


def test_memory_stays_flat_while_walking_a_big_array(tmp_path):
    """A 40 MB array is walked holding about one chunk: Python's peak allocation while framing
    stays a few MB, far under the file's size."""
    path = tmp_path / "big.json"
    element = json.dumps({"instruction": "Describe a river " * 10, "output": "A river flows. " * 40})
    with path.open("w") as handle:
        handle.write("[" + ",\n".join([element] * (40_000_000 // len(element))) + "]")
    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            count = sum(1 for _ in JsonFramer(handle, 4_000_000, 2000).elements())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 40_000_000 // len(element)
    assert peak < 8_000_000, peak
