"""The forge client: what reconciler writes back to GitHub and GitLab.

    cli (pr-comment) ──upsert_pr_comment──▶ Forge ──HTTPS (urllib)──▶ the provider's REST API
    daemon (commit statuses) ──set_commit_status──┘

Two things only: the plan of a pull request posted as one comment that later runs update in
place (found by a hidden marker), and commit statuses (pending / success / failure). Callers see
the ``Forge`` Protocol and ``open_forge``; the providers live in ``github.py`` and ``gitlab.py``
over the one small HTTP client in ``http.py`` (timeouts, no redirect to another host, tokens
never in a message). Every failure is a one-line ``ForgeError``.
"""

from reconciler.forge.api import COMMENT_MARKER, CommitStatus, Forge
from reconciler.forge.connect import PROVIDERS, open_forge
from reconciler.forge.http import ForgeError

__all__ = ["COMMENT_MARKER", "PROVIDERS", "CommitStatus", "Forge", "ForgeError", "open_forge"]
