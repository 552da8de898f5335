"""The one logging configuration of every ``reconciler`` command: one line per record, plain
or JSON, on stderr.

    cli.main ──configure_logging──▶ root handler ──ContextFilter──▶ RedactingFilter ──▶ format

JSON lines carry ``ts``, ``level``, ``logger``, ``msg`` and every field passed with
``extra={...}`` or set for a unit of work with ``log_context.log_fields`` (a cycle's
``revision`` and ``term``, an action's ``vm``, ``outcome``, ``duration_s`` ...), so a log
shipper can index them without parsing prose; plain lines show them as ``key=value``.

Every line is scrubbed before it is formatted (``RedactingFilter`` on the handler): an error
message that quotes ``https://user:token@host/fleet.git``, a libpq ``password=``, or a value the
daemon knows to be secret (an env value, the API token) never reaches a journal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from reconciler.daemon.redaction import Redactor
from reconciler.log_context import ContextFilter

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Rewrites each record in place: its message (arguments merged), the text of its
    exception and every string passed with ``extra={...}`` go through the ``Redactor``.

    On the handler, not on a logger: a logger's filters do not see its children's records."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.text(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.text(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.redactor.text(value))
        return True


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    # exc_text is what the RedactingFilter left; formatting exc_info again would undo it.
    if record.exc_text:
        return record.exc_text
    return formatter.formatException(record.exc_info) if record.exc_info else ""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info or record.exc_text:
            entry["exc"] = _exception_text(self, record)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        if record.exc_info or record.exc_text:
            line += "\n" + _exception_text(self, record)
        return line


LOG_FORMATS = ("plain", "json")


def configure_logging(
    log_format: str = "plain",
    verbosity: int = 0,
    *,
    level: int = logging.WARNING,
    redactor: Redactor | None = None,
    keep_foreign: bool = False,
) -> Redactor:
    """One stderr handler on the root logger, for any command. ``level`` is the command's
    quietest level (a one-shot command warns, the daemon says what it does); each ``-v``
    says more. Returns the handler's redactor (``log_redactor``): the daemon teaches it the
    secret values it learns, so they are masked in the log too.

    With ``keep_foreign`` (``cli.main``), a root logger that already has handlers this
    function did not install is left as it is, as ``logging.basicConfig`` would: the program
    that embeds the CLI (or a test harness) owns its logging."""
    root = logging.getLogger()
    if keep_foreign and any(
        not any(isinstance(f, RedactingFilter) for f in h.filters) for h in root.handlers
    ):
        return log_redactor()
    redactor = redactor or Redactor()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    handler.addFilter(ContextFilter())  # first: the context's fields are scrubbed too
    handler.addFilter(RedactingFilter(redactor))
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel((level, min(level, logging.INFO), logging.DEBUG)[min(verbosity, 2)])
    # APScheduler logs every job run at INFO: a line every poll says nothing an operator needs.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "3 changes detected"
    return redactor


def log_redactor() -> Redactor:
    """The redactor of the handler ``configure_logging`` installed (a new one without it)."""
    for handler in logging.getLogger().handlers:
        for found in handler.filters:
            if isinstance(found, RedactingFilter):
                return found.redactor
    return Redactor()
