"""The source layer: the only code that touches Git.

A ``Source`` turns a ref into a full commit SHA and a SHA into a directory holding exactly that
commit's tree. Downstream (``manifests``) reads plain directories and never sees git.

    location + ref ──resolve──▶ sha ──checkout──▶ <cache>/trees/<sha>/
    fetch (a remote's mirror), is_ancestor (rollback protection), changed_paths (logs)
    tree_entries (Git tree ids: what lets the manifests layer reuse unchanged workloads)

The ``Source`` Protocol (``git.py``) is everything the pipeline, ``apply`` and the daemon read
of a repository; ``GitSource`` implements it, ``verifier.VerifiedSource`` wraps one so that only
signed trees are served, and tests pass a fake (``tests/support/fakes.py``).
"""

from reconciler.source.git import GitSource, Source, open_source

__all__ = ["GitSource", "Source", "open_source"]
