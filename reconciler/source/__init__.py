"""The source layer: the only code that touches Git.

A ``Source`` turns a ref into a full commit SHA and a SHA into a directory holding exactly that
commit's tree. Downstream (``manifests``) reads plain directories and never sees git.

    location + ref ──resolve──▶ sha ──checkout──▶ <cache>/trees/<sha>/
"""

from reconciler.source.git import GitSource, Source, open_source

__all__ = ["GitSource", "Source", "open_source"]
