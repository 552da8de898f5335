"""VM networking: one bridge per host, one TAP per VM, addresses from the fleet's pool.

    Network.attach(vm) ──▶ allocate address (state db) ──▶ ensure bridge ──▶ ensure TAP
                      ──▶ NetworkAttachment (TAP, MAC, address, gateway) for the runtime

The guest's address reaches its init on the kernel command line (``rc.ip``, ``rc.gateway``).
``detach`` removes the TAP and returns the address; ``cleanup_orphans`` removes TAPs no known VM
owns (left by a crash between creating a TAP and recording the VM); ``sync_firewall`` loads the
nftables rules that keep workloads apart unless declared (``firewall``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from reconciler.model import NetworkPool
from runtime.network.allocator import AddressAllocator, Lease
from runtime.network.firewall import firewall_rules, load_rules
from runtime.network.links import Links, scope_for, tap_name
from runtime.protocol import NetworkAttachment

__all__ = ["AddressAllocator", "Lease", "Links", "Network", "scope_for", "tap_name"]


class Network:
    def __init__(
        self, pool: NetworkPool, db_path: Path, *, netns: str | None = None, scope: str = ""
    ) -> None:
        self.pool = pool
        self.scope = scope
        self.allocator = AddressAllocator(db_path, pool.cidr)
        self.links = Links(netns)

    def attach(self, vm: str, workload: str) -> NetworkAttachment:
        lease = self.allocator.allocate(vm, workload)
        prefixlen = self.allocator.network.prefixlen
        self.links.ensure_bridge(self.pool.bridge, lease.gateway, prefixlen)
        tap = tap_name(vm, self.scope)
        self.links.ensure_tap(tap, self.pool.bridge)
        return NetworkAttachment(
            tap=tap, mac=lease.mac, address=lease.address, gateway=lease.gateway
        )

    def detach(self, vm: str) -> None:
        self.links.delete(tap_name(vm, self.scope))
        self.allocator.release(vm)

    def cleanup_orphans(self, known_vms: set[str]) -> list[str]:
        """Remove TAPs and addresses of VMs that are not in ``known_vms``; returns their names."""
        known_taps = {tap_name(vm, self.scope) for vm in known_vms}
        mine = self.links.names(f"rc{self.scope}-")
        removed = [tap for tap in mine if tap not in known_taps]
        for tap in removed:
            self.links.delete(tap)
        for lease in self.allocator.leases():
            if lease.vm not in known_vms:
                self.allocator.release(lease.vm)
        return removed

    def sync_firewall(
        self, addresses: Mapping[str, Sequence[str]], depends_on: Mapping[str, Sequence[str]]
    ) -> None:
        """Load the rules for these VMs (workload -> addresses) and dependencies."""
        rules = firewall_rules(
            f"rc{self.scope}-",
            self.pool.cidr,
            addresses,
            depends_on,
            nat=self.pool.nat,
            table=f"reconciler{self.scope}",
        )
        load_rules(rules, netns=self.links.netns)

    def close(self) -> None:
        self.allocator.close()
