"""Manifests: from a checked-out revision to a validated ``DesiredFleet``.

Reads a plain directory (the source layer checked it out); never touches git. Hostile input is
expected: caps on sizes and counts, alias bombs, duplicate keys, paths and symlinks leaving the
revision are all refused, and every problem is reported at once with file, line and JSON path.
"""

from reconciler.manifests.limits import DEFAULT_LIMITS, Limits
from reconciler.manifests.loader import ParseCache, load_fleet, load_remembered

__all__ = ["DEFAULT_LIMITS", "Limits", "ParseCache", "load_fleet", "load_remembered"]
