"""Rollback protection: a new revision must descend from the one applied last.

    resolve head ──verify signature──▶ require_descendant(source, applied, head) ──▶ load, apply

A signature says who made a commit, not when it is meant to run. An old signed revision (with a
known vulnerability, or a workload since removed for a reason) is as well signed today as it
was then; whoever can push to the followed branch, or answer as the remote, could roll the
fleet back to it. So ``apply`` and the daemon act on a head only when it is the applied
revision or descends from it (``git merge-base --is-ancestor``). Going back on purpose, or
following a rewritten branch, takes ``--allow-non-descendant``.
"""

from __future__ import annotations

from reconciler.errors import NotDescendantError, SourceError
from reconciler.formatting import short_sha
from reconciler.source.git import Source


def require_descendant(source: Source, applied: str | None, head: str, *, allow: bool) -> None:
    """``NotDescendantError`` unless ``head`` is ``applied`` or descends from it (or ``allow``).

    No applied revision yet: anything goes (the first apply of a host). An applied revision
    that the repository no longer holds counts as not an ancestor.
    """
    if applied is None or applied == head or allow:
        return
    try:
        descends = source.is_ancestor(applied, head)
    except SourceError as err:
        raise NotDescendantError(
            f"refusing {short_sha(head)}: the applied revision {short_sha(applied)} "
            "cannot be found in "
            f"{source.describe()} to check that {short_sha(head)} descends from it ({err}); "
            "pass --allow-non-descendant if the history was rewritten on purpose"
        ) from err
    if not descends:
        raise NotDescendantError(
            f"refusing {short_sha(head)}: it does not descend from the applied revision "
            f"{short_sha(applied)} (a rollback or a rewritten history); "
            "pass --allow-non-descendant to apply it anyway"
        )
