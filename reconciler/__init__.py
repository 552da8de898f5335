"""reconciler: GitOps for microVM fleets.

A fleet repository of declarative manifests is read at a Git revision, compiled into a
``DesiredFleet``, compared by a pure planner with the ``ObservedFleet`` that actually runs, and
the resulting ``Plan`` is either rendered (``diff``) or executed (``apply`` / ``daemon``).
See the README's architecture section for the layers and the rules between them.
"""

__version__ = "0.1.0"
