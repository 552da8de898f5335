"""The project's one exception tree.

Every expected failure is raised as a subclass of :class:`ReconcilerError` and translated
exactly once, in ``reconciler.cli.main``, into one line on stderr and an exit code. Third-party
exceptions (GitPython, jsonschema, subprocess, psycopg, pyroute2 ...) are caught at the edge that
calls them and re-raised as one of these with ``raise ... from exc``.

Tree (``T``: terminal, see below)::

    ReconcilerError            exit 1   anything the user can fix; never shown as a traceback
    ├── ConfigError                     bad flags, settings or environment
    ├── SourceError                     git: unreachable remote, unknown ref, bad checkout
    │   ├── SignatureError         T    a commit unsigned, or not signed by a trusted key
    │   └── NotDescendantError     T    a head that does not descend from the applied revision
    ├── ManifestError              T    invalid documents; carries every ``Problem`` at once
    ├── PlanError                       a saved plan that is stale or unreadable
    │   ├── DeletionGuardError     T    (``planning.guard``) a plan that deletes too much
    │   └── CapacityError               (``planning.placed``) a plan the hosts cannot hold
    ├── StateError                      the state store cannot be read or written
    ├── BuildError                      a build failed or a tool is missing
    │   └── ToolMissingError            names the tool and how to install it
    ├── VMRuntimeError                  a VMM or process runtime failed
    ├── NetworkError                    bridges, TAP devices, addresses
    ├── LeadershipError                 the lease cannot be taken, renewed or reached
    │   └── StaleTermError              a write or action carried a term that is no longer current
    ├── SupersededError                 a rollout stopped waiting: a newer revision arrived
    └── NotImplementedFeatureError T    a capability that is not built yet, said plainly

Exit codes follow Terraform's ``-detailed-exitcode`` for ``diff``: 0 no changes, 2 changes,
1 error. Every error therefore exits 1; the subclasses exist so callers can react to the kind of
failure (the daemon keeps the last good revision on a ``ManifestError``, for instance).

Terminal or transient (``ReconcilerError.terminal``, as Flux's controllers tell a stalled
reconcile from one to requeue): a *terminal* error is a property of the input, so the same
commit will fail the same way however often it is tried (invalid manifests, a bad signature, a
head that is not a descendant, a plan over the deletion guards, a feature not built yet); the
daemon parks such a revision until the head moves. A *transient* one (the default: a build that
may succeed next time, a VMM that failed to start, an unreachable remote, a busy store) is
retried with exponential back-off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away


class ReconcilerError(Exception):
    """Base of every expected failure. ``str(err)`` is the one line shown to the user."""

    exit_code: int = EXIT_ERROR
    terminal: bool = False
    """The same input always fails the same way: retrying it cannot help (module docstring)."""

    def lines(self) -> list[str]:
        """The lines printed on stderr for this error (one, unless a subclass has more)."""
        return [str(self)]


class ConfigError(ReconcilerError):
    """Invalid command-line options, settings or environment."""


class SourceError(ReconcilerError):
    """The fleet repository could not be read at the requested revision."""


class SignatureError(SourceError):
    """A commit is unsigned, or its signature is bad or not by a trusted (unrevoked, unexpired)
    key. Its signature will not change: terminal."""

    terminal = True


class NotDescendantError(SourceError):
    """A head that does not descend from the applied revision (a rollback, a rewritten
    history), or whose descent cannot be checked. Asking again gives the same answer: terminal."""

    terminal = True


@dataclass(frozen=True, order=True)
class Problem:
    """One problem found in a revision's manifests: where it is and what is wrong.

    ``file`` is relative to the fleet root, ``line`` is 1-based (0 when unknown) and
    ``path`` is a JSON path inside the document (``$.spec.deploy.replicas``).
    """

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line <= 0 else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(ReconcilerError):
    """A revision is invalid. All its problems are collected and reported together."""

    terminal = True

    def __init__(self, problems: Iterable[Problem], summary: str = "") -> None:
        self.problems: Sequence[Problem] = sorted(set(problems))
        count = len(self.problems)
        self.summary = summary or f"{count} problem{'s' if count != 1 else ''} in the manifests"
        super().__init__(self.summary)

    def lines(self) -> list[str]:
        return [*(str(p) for p in self.problems), f"error: {self.summary}; nothing was changed"]


class PlanError(ReconcilerError):
    """A plan cannot be made, read or applied (for example a saved plan gone stale)."""


class StateError(ReconcilerError):
    """The state store cannot be opened, read or written."""


class BuildError(ReconcilerError):
    """A build failed; the message carries the tail of the build log."""


class ToolMissingError(BuildError):
    """A build or runtime tool is not installed."""

    def __init__(self, tool: str, how_to_install: str) -> None:
        self.tool = tool
        self.how_to_install = how_to_install
        super().__init__(f"{tool} is not installed: {how_to_install}")


class VMRuntimeError(ReconcilerError):
    """A VMM or the process runtime failed to start, stop or report a VM."""


class NetworkError(ReconcilerError):
    """Bridges, TAP devices, NAT rules or address allocation failed."""


class LeadershipError(ReconcilerError):
    """The lease could not be held, or an action carried a stale term (fencing)."""


class StaleTermError(LeadershipError):
    """Fencing refused a write or runtime action: its term is older than the current one, or
    the lease was not renewed within the renew deadline. The caller must stop acting."""


class SupersededError(ReconcilerError):
    """A rollout stopped waiting for its VMs to get healthy because a newer revision arrived;
    the daemon goes on with the newer one instead of rolling back or waiting out the timeout."""


class NotImplementedFeatureError(ReconcilerError):
    """A capability that the project does not have yet. Raised instead of a silent no-op."""

    terminal = True

    def __init__(self, feature: str) -> None:
        super().__init__(f"{feature} is not implemented yet in this version of reconciler")
