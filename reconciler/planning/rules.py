"""Which change to a VM's settings disturbs it how much.

The compile step flattens every VM's configuration into keys (``model.vm_settings``); this table
says, per key, the least disruptive way to apply a change. The planner takes the worst class over
all changed keys. A key that no rule knows is treated as a replace: when in doubt, recreate
rather than leave a VM running a configuration it never received.
"""

from __future__ import annotations

from reconciler.model import Disruption

# Exact keys first, then prefixes (keys ending with ".").
_RULES: tuple[tuple[str, Disruption], ...] = (
    # The VM's identity as a machine: a new image, VMM or size needs a new VM.
    ("runtime", Disruption.REPLACE),
    ("target", Disruption.REPLACE),
    ("artifact", Disruption.REPLACE),
    ("deploy.vcpus", Disruption.REPLACE),
    ("deploy.memoryMiB", Disruption.REPLACE),
    ("deploy.kernel", Disruption.REPLACE),
    ("deploy.kernelArgs", Disruption.REPLACE),
    # Handed to the guest init at boot (kernel command line): a restart picks them up, and the
    # VM keeps its address and disk.
    ("deploy.env.", Disruption.RESTART),
    # Secrets travel the same way: a new value (a new keyed digest) is a restart.
    ("deploy.secretEnv.", Disruption.RESTART),
    ("deploy.secretFiles.", Disruption.RESTART),
    ("deploy.args", Disruption.RESTART),
    ("deploy.ports", Disruption.RESTART),
    ("deploy.restartPolicy", Disruption.RESTART),
    # A volume is attached at boot; a bigger one is grown while the VM is stopped, and the
    # disk itself outlives the restart (a smaller one is refused by ``diff``).
    ("deploy.volumes.", Disruption.RESTART),
    # Read by the host only: the running guest does not notice.
    ("deploy.health", Disruption.IN_PLACE),
    ("deploy.dependsOn", Disruption.IN_PLACE),
    ("metadata.labels.", Disruption.IN_PLACE),
    # Read by the host when a prune deletes the VM, never by the guest.
    ("deploy.volumeReclaim.", Disruption.IN_PLACE),
    # A promise about future plans (``guard``), recorded on the VM so that removing the
    # workload from the revision cannot remove the promise with it.
    ("deploy.preventDestroy", Disruption.IN_PLACE),
)


def disruption_of(key: str) -> Disruption:
    """The disruption class of a change to settings ``key``."""
    for pattern, disruption in _RULES:
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)):
            return disruption
    return Disruption.REPLACE
