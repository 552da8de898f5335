"""VM networking: one bridge per host, one port per VM, addresses from the fleet's pool.

    Network.attach(vm) ──▶ allocate address (state db) ──▶ ensure bridge ──▶ ensure TAP
                      ──▶ NetworkAttachment (TAP, MAC, address, gateway) for the runtime
    Network.attach(vm, namespace=True) ──▶ ... ──▶ ensure the VM's network namespace on a veth
                      pair (``netns``), configured from the host ──▶ NetworkAttachment whose
                      ``tap`` names both the host end and the namespace (host processes)

A microVM's address reaches its init, which configures the guest's interface; a host process's
namespace is configured here, before it starts. ``detach`` removes the TAP or the veth and the
namespace and returns the address; ``cleanup_orphans`` removes the ports and namespaces no
known VM owns (left by a crash between creating them and recording the VM); ``sync_firewall``
loads the nftables rules that keep workloads apart unless declared (``firewall``), for TAPs and
veths alike.

In a fleet of hosts each host's bridge and VMs take the host's own subnet of the pool
(``Network(subnet=...)``, from ``carving.host_subnet``), hosts route each other's subnets
(``routes.sync_host_routes``), and ``sync_firewall`` is given every host's VMs, so the rules
judge routed traffic between hosts as they judge bridged traffic on one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path

from reconciler.errors import NetworkError
from reconciler.lifetimes import ClosedOnExit
from reconciler.model import NetworkPool
from runtime.network.allocator import AddressAllocator, Lease
from runtime.network.firewall import firewall_rules, load_rules
from runtime.network.links import Links, scope_for, tap_name
from runtime.network.netns import (
    ensure_vm_namespace,
    namespace_path,
    namespaces,
    remove_vm_namespace,
)
from runtime.protocol import NetworkAttachment

__all__ = [
    "AddressAllocator",
    "Lease",
    "Links",
    "Network",
    "namespace_path",
    "scope_for",
    "tap_name",
]


def _inside(subnet: str, cidr: str) -> bool:
    try:
        return ipaddress.IPv4Network(subnet).subnet_of(ipaddress.IPv4Network(cidr))
    except ValueError:
        return False


class Network(ClosedOnExit):
    def __init__(
        self,
        pool: NetworkPool,
        db_path: Path,
        *,
        netns: str | None = None,
        scope: str = "",
        subnet: str | None = None,
    ) -> None:
        """``subnet``: this host's part of the pool in a fleet of hosts (``carving``); None
        for one host, which uses the whole pool."""
        if subnet is not None and not _inside(subnet, pool.cidr):
            raise NetworkError(f"the host's subnet {subnet} is not inside the pool {pool.cidr}")
        self.pool = pool
        self.scope = scope
        self.allocator = AddressAllocator(db_path, subnet or pool.cidr)
        self.links = Links(netns)

    def attach(self, vm: str, workload: str, *, namespace: bool = False) -> NetworkAttachment:
        """The VM's port on the fleet bridge: a TAP, or (``namespace``) a network namespace of
        its own on a veth pair, both named ``attachment.tap``."""
        lease = self.allocator.allocate(vm, workload)
        prefixlen = self.allocator.network.prefixlen
        self.links.ensure_bridge(self.pool.bridge, lease.gateway, prefixlen)
        tap = tap_name(vm, self.scope)
        if namespace:
            ensure_vm_namespace(
                self.links,
                tap,
                bridge=self.pool.bridge,
                address=lease.address,
                gateway=lease.gateway,
                mac=lease.mac,
            )
        else:
            self.links.ensure_tap(tap, self.pool.bridge)
            remove_vm_namespace(tap)  # this VM ran as a host process before
        return NetworkAttachment(
            tap=tap, mac=lease.mac, address=lease.address, gateway=lease.gateway
        )

    def detach(self, vm: str) -> None:
        # The host end first: a namespace is destroyed asynchronously, and its veth with it.
        self.links.delete(tap_name(vm, self.scope))
        remove_vm_namespace(tap_name(vm, self.scope))
        self.allocator.release(vm)

    def cleanup_orphans(self, known_vms: set[str]) -> list[str]:
        """Remove the TAPs, veths, namespaces and addresses of VMs that are not in
        ``known_vms``; returns the names of the devices and namespaces removed."""
        known_taps = {tap_name(vm, self.scope) for vm in known_vms}
        prefix = f"rc{self.scope}-"
        mine = self.links.names(prefix)
        removed = [tap for tap in mine if tap not in known_taps]
        for tap in removed:
            self.links.delete(tap)
        for name in namespaces(prefix):
            if name not in known_taps:
                remove_vm_namespace(name)
                if name not in removed:
                    removed.append(name)
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
