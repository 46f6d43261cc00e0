"""Stable identifiers: the same content gets the same id on every run and every machine."""
from __future__ import annotations

import hashlib
from typing import Iterable

# What the ids hash, shared with their Spark twins (``stages.finalize.content_id_col`` and the
# merge ids of ``choose_merges``) so that both give the same id for the same text.
ID_SEPARATOR = "\x1f"  # unit separator: cannot appear in normalised text by accident of concatenation
MERGED_ID_TAG = "merge"  # first field of a merge's id: keeps it apart from any record id
DEFAULT_ID_LENGTH = 32   # hex characters kept (``ingest.id_length``'s default)


def content_id(instruction: str, input: str, output: str,  # noqa: A002
               length: int = DEFAULT_ID_LENGTH) -> str:
    """SHA-256 of the normalised fields, hex, first ``length`` characters."""
    digest = hashlib.sha256(ID_SEPARATOR.join((instruction, input, output)).encode("utf-8")).hexdigest()
    return digest[:length]


def group_id(member_ids: Iterable[str], length: int = DEFAULT_ID_LENGTH) -> str:
    """Hash of the sorted member ids: the same members always make the same group."""
    digest = hashlib.sha256(ID_SEPARATOR.join(sorted(member_ids)).encode("utf-8")).hexdigest()
    return digest[:length]


def merged_id(group_id: str, instruction: str, input: str, output: str,  # noqa: A002
              length: int = DEFAULT_ID_LENGTH) -> str:
    """Id of an accepted merge: SHA-256 of ``MERGED_ID_TAG``, its group id and the merged fields. The
    group id makes it unique per group (two groups answered with the same text, or a merge equal
    to a record, still get distinct ids), and the extra field keeps it apart from any record id."""
    digest = hashlib.sha256(ID_SEPARATOR.join((MERGED_ID_TAG, group_id, instruction, input, output)).encode("utf-8"))
    return digest.hexdigest()[:length]
