"""Stable identifiers: the same content gets the same id on every run and every machine."""
from __future__ import annotations

import hashlib
from typing import Iterable

_SEP = "\x1f"  # unit separator: cannot appear in normalised text by accident of concatenation


def content_id(instruction: str, input: str, output: str, length: int = 32) -> str:  # noqa: A002
    """SHA-256 of the normalised fields, hex, first ``length`` characters."""
    digest = hashlib.sha256(_SEP.join((instruction, input, output)).encode("utf-8")).hexdigest()
    return digest[:length]


def group_id(member_ids: Iterable[str], length: int = 32) -> str:
    """Hash of the sorted member ids: the same members always make the same group."""
    digest = hashlib.sha256(_SEP.join(sorted(member_ids)).encode("utf-8")).hexdigest()
    return digest[:length]


def merged_id(group_id: str, instruction: str, input: str, output: str,  # noqa: A002
              length: int = 32) -> str:
    """Id of an accepted merge: SHA-256 of ``"merge"``, its group id and the merged fields. The
    group id makes it unique per group (two groups answered with the same text, or a merge equal
    to a record, still get distinct ids), and the extra field keeps it apart from any record id."""
    digest = hashlib.sha256(_SEP.join(("merge", group_id, instruction, input, output)).encode("utf-8"))
    return digest.hexdigest()[:length]
