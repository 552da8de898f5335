"""Leader election between daemon replicas: the ``Lease`` Protocol, its backends and fencing."""

from reconciler.leadership.protocol import Lease, LeaseHolder, LeaseSettings

__all__ = ["Lease", "LeaseHolder", "LeaseSettings"]
