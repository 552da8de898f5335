"""Caps that keep a hostile revision from exhausting the reconciler."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 1 << 20
    max_files: int = 10_000
    max_documents: int = 50_000
    max_total_bytes: int = 256 << 20
    max_nodes_per_document: int = 100_000
    """Nodes of a document with every alias expanded: refuses "billion laughs"."""


DEFAULT_LIMITS = Limits()
