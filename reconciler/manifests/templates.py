"""Rendering of ``*.yaml.j2`` manifests with the Fleet's ``variables``.

A sandboxed Jinja2 environment (templates cannot reach Python internals) with ``StrictUndefined``
(a misspelt variable is an error, never an empty string). Rendering happens before YAML parsing
and validation, so a rendered document is checked like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from reconciler.manifests.yaml_loader import YAMLProblem

_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)


def render_template(text: str, variables: Mapping[str, Any]) -> str:
    """The rendered text; a template error raises ``YAMLProblem`` with its line."""
    try:
        return _ENV.from_string(text).render(dict(variables))
    except jinja2.TemplateSyntaxError as exc:
        raise YAMLProblem(f"template syntax error: {exc.message}", exc.lineno or 0) from exc
    except jinja2.UndefinedError as exc:
        raise YAMLProblem(
            f"template error: {exc.message} (define it in the Fleet's spec.variables)"
        ) from exc
    except jinja2.TemplateError as exc:
        raise YAMLProblem(f"template error: {exc}") from exc
    except (ArithmeticError, TypeError, ValueError) as exc:
        raise YAMLProblem(f"template error: {exc}") from exc
