"""Renderers of a ``Plan``: text (like ``terraform plan``), JSON (stable, see
docs/plan-format.md) and Markdown (a pull-request comment). They read the plan only; all three
show the same actions in the same order."""

from __future__ import annotations

from collections.abc import Callable

from reconciler.model import Plan
from reconciler.render.json_format import render_json
from reconciler.render.markdown import render_markdown
from reconciler.render.text import render_text

RENDERERS: dict[str, Callable[[Plan], str]] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
}

__all__ = ["RENDERERS", "render_json", "render_markdown", "render_text"]
