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

    # Templates run in a child process (``templates.py``); each one gets these.
    template_cpu_seconds: float = 5.0
    """CPU time of one template: rendering a real manifest takes milliseconds."""
    template_seconds: float = 20.0
    """Wall-clock time of one template, for a child that does not get the CPU (a busy host)."""
    template_memory_bytes: int = 256 << 20
    """Address space a template may add to the renderer's."""
    template_output_bytes: int = 1 << 20
    """Rendered text of one template: what a plain manifest file may hold (max_file_bytes)."""
    templates_total_seconds: float = 120.0
    """Wall-clock time of all templates of a revision: a daemon cycle is never blocked longer."""


DEFAULT_LIMITS = Limits()
