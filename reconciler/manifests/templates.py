"""Rendering of ``*.yaml.j2`` manifests with the Fleet's ``variables``, in a child process.

    loader ──(name, text)...──▶ render_templates ──▶ one child per revision ──▶ text or problem

Jinja2's sandbox keeps templates away from Python internals, and ``StrictUndefined`` makes a
misspelt variable an error, never an empty string. The sandbox does not bound resources: a
recursive macro, ``'a' * 3000000000`` or three nested loops of 100,000 turns would take the
reconciler's memory or time (and, in the daemon, its only worker) with them. So every template
of a revision is rendered in one child process (forked directly, or from a ``forkserver`` when
the process has threads, as the daemon does) under:

* ``RLIMIT_AS``: the address space a template may add (``Limits.template_memory_bytes``);
* ``RLIMIT_CPU``: CPU seconds per template (the soft limit moves with each template; the
  ``SIGXCPU`` it raises stops that template only), and a hard limit for the whole child;
* an output cap, checked while the output is generated;
* wall-clock limits per template and per revision, enforced by the parent, which kills the
  child and goes on with a new one for the templates after the culprit.

Every failure is one line for its file (``template exceeded its memory limit (256 MiB)``),
never a traceback. Rendering happens before YAML parsing and validation, so a rendered
document is checked like any other.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType, TracebackType
from typing import Any

from reconciler.manifests.limits import Limits

_MESSAGE_LENGTH = 300


@dataclass(frozen=True)
class Rendered:
    """One template's outcome: ``text``, or a one-line ``message`` at ``line`` (0: unknown)."""

    text: str | None
    message: str = ""
    line: int = 0


class _CPUExceeded(BaseException):
    """Raised by the SIGXCPU handler; a BaseException so that no ``except Exception`` inside
    the template engine swallows it."""


class _OutputExceeded(Exception):
    pass


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_LENGTH else line[: _MESSAGE_LENGTH - 3] + "..."


def _template_line(tb: TracebackType | None) -> int:
    """The template line where rendering failed: Jinja2 rewrites tracebacks so that template
    frames carry the template's own line numbers."""
    line = 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(exc: BaseException, limits: Limits) -> tuple[str, int]:
    import jinja2  # noqa: PLC0415 (only the child renders)

    if isinstance(exc, _CPUExceeded):
        return f"template exceeded its CPU limit ({limits.template_cpu_seconds:g} s)", 0
    if isinstance(exc, MemoryError):
        mib = limits.template_memory_bytes >> 20
        return f"template exceeded its memory limit ({mib} MiB)", 0
    if isinstance(exc, _OutputExceeded):
        return (
            f"template output exceeds the limit of {limits.template_output_bytes} bytes",
            _template_line(exc.__traceback__),
        )
    if isinstance(exc, RecursionError):
        return "template nests or recurses too deeply (a macro calling itself?)", 0
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"template syntax error: {_one_line(exc.message or '')}", exc.lineno or 0
    line = _template_line(exc.__traceback__)
    if isinstance(exc, jinja2.UndefinedError):
        message = _one_line(exc.message or str(exc))
        return f"template error: {message} (define it in the Fleet's spec.variables)", line
    if isinstance(exc, jinja2.TemplateError):
        return f"template error: {_one_line(str(exc))}", line
    return f"template error: {type(exc).__name__}: {_one_line(str(exc))}", line


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _on_sigxcpu(signum: int, frame: FrameType | None) -> None:
    raise _CPUExceeded


def _render_one(env: Any, text: str, variables: dict[str, Any], limits: Limits) -> str:
    template = env.from_string(text)
    chunks: list[str] = []
    size = 0
    for chunk in template.generate(variables):
        size += len(chunk)  # characters: a lower bound of the bytes, checked again below
        if size > limits.template_output_bytes:
            raise _OutputExceeded
        chunks.append(chunk)
    rendered = "".join(chunks)
    if len(rendered.encode("utf-8", "surrogatepass")) > limits.template_output_bytes:
        raise _OutputExceeded
    return rendered


def _child(
    conn: Connection,
    templates: Sequence[tuple[str, str]],
    variables: dict[str, Any],
    limits: Limits,
) -> None:
    """Renders ``templates`` in order, sending ``ok`` or ``error`` for each: the parent knows
    that the child works on the template after the last one it heard of."""
    import jinja2  # noqa: PLC0415 (preloaded in the forkserver)
    from jinja2.sandbox import SandboxedEnvironment  # noqa: PLC0415

    memory = _address_space() + limits.template_memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    per_template = math.ceil(limits.template_cpu_seconds)
    hard = math.ceil(_cpu_used()) + per_template * len(templates) + 2
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    for index, (_, text) in enumerate(templates):
        # The soft limit follows each template, so one that loops stops alone; the hard limit
        # (SIGKILL) catches a template stuck where Python cannot run the signal handler.
        soft = min(math.ceil(_cpu_used()) + per_template, hard - 1)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        try:
            rendered = _render_one(env, text, variables, limits)
        except BaseException as exc:  # one line per template, whatever happened
            message, line = _describe(exc, limits)
            del exc
            conn.send(("error", index, message, line))
        else:
            conn.send(("ok", index, rendered))
            del rendered
    conn.send(("done",))
    conn.close()


_FORKSERVER: Any = None


def _context() -> Any:
    """``fork`` in a single-threaded process (a CLI command: the child starts in
    milliseconds with everything imported), else a ``forkserver`` (the daemon has threads, and
    a fork would copy whatever locks they hold). The forkserver is started once per process
    and preloads the project's modules that the process has imported: each child re-imports the
    main script (``multiprocessing`` does), and finds them there instead of paying for them."""
    global _FORKSERVER  # noqa: PLW0603 (one forkserver per process, started on first use)
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if _FORKSERVER is None:
        context = multiprocessing.get_context("forkserver")
        project = sorted(
            name
            for name in sys.modules
            if name.split(".")[0] in ("reconciler", "builders", "runtime")
            and not name.endswith("__main__")
        )
        # Replaces the default preload of __main__, which would run the CLI in the server.
        context.set_forkserver_preload([__name__, "jinja2.sandbox", *project])
        _FORKSERVER = context
    return _FORKSERVER


def _death(exitcode: int | None, limits: Limits) -> str:
    if exitcode is not None and -exitcode in (signal.SIGXCPU, signal.SIGKILL):
        return f"template exceeded its CPU limit ({limits.template_cpu_seconds:g} s)"
    if exitcode is not None and exitcode < 0:
        return f"the template renderer died ({signal.Signals(-exitcode).name})"
    return f"the template renderer stopped (exit status {exitcode})"


def render_templates(
    templates: Sequence[tuple[str, str]], variables: Mapping[str, Any], limits: Limits
) -> dict[str, Rendered]:
    """The outcome of each ``(name, text)``, keyed by name, rendered in as few children as the
    templates allow (one, unless one of them has to be killed)."""
    results: dict[str, Rendered] = {}
    pending = list(templates)
    deadline = time.monotonic() + limits.templates_total_seconds
    while pending:
        _render_batch(pending, dict(variables), limits, deadline, results)
        pending = [t for t in pending if t[0] not in results]
        if pending and time.monotonic() >= deadline:
            for name, _ in pending:
                results[name] = Rendered(
                    None,
                    "not rendered: the revision's templates took longer than "
                    f"{limits.templates_total_seconds:g} s",
                )
            break
    return results


def _render_batch(
    batch: Sequence[tuple[str, str]],
    variables: dict[str, Any],
    limits: Limits,
    deadline: float,
    results: dict[str, Rendered],
) -> None:
    """One child over ``batch``; stops at the first template the child cannot finish."""
    context = _context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(
        target=_child, args=(writer, list(batch), variables, limits), daemon=True
    )
    current = 0
    try:
        process.start()
    except OSError as exc:  # no process left, no memory: the revision cannot be rendered now
        reader.close()
        writer.close()
        for name, _ in batch:
            results[name] = Rendered(
                None, f"not rendered: the template renderer cannot start ({exc})"
            )
        return
    writer.close()
    try:
        while True:
            wait = min(limits.template_seconds, deadline - time.monotonic())
            if wait <= 0 or not reader.poll(wait):
                process.kill()
                seconds = min(limits.template_seconds, limits.templates_total_seconds)
                results[batch[current][0]] = Rendered(
                    None, f"template exceeded its time limit ({seconds:g} s)"
                )
                return
            try:
                message = reader.recv()
            except Exception:  # EOF, or a message cut short by the child's death
                process.join(5)
                results[batch[current][0]] = Rendered(None, _death(process.exitcode, limits))
                return
            kind = message[0]
            if kind == "done":
                return
            results[batch[message[1]][0]] = (
                Rendered(message[2]) if kind == "ok" else Rendered(None, message[2], message[3])
            )
            current = message[1] + 1
            if current == len(batch):
                return  # every template answered; "done" adds nothing
    finally:
        reader.close()
        if process.is_alive():
            process.kill()
        process.join()
        process.close()
