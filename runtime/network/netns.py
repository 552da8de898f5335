"""Network namespaces for host-process VMs: the process runtime's equivalent of a TAP device.

    Network.attach(vm, namespace=True) ──▶ ensure_vm_namespace:
        named netns "<host end>" ──▶ veth pair: host end on the fleet bridge (named like a TAP,
        so the fleet's nftables rules and orphan cleanup see it), "eth0" inside with the VM's
        pool address and MAC, "lo" up, default route via the bridge address
    ProcessRuntime.start ──▶ ``nsenter --net=<namespace_path(...)>`` ──▶ the sandbox

A microVM's guest kernel configures its own interface; a host process has no kernel of its own,
so the host configures the namespace for it, from the outside, with pyroute2. The workload
inside has no capability over this namespace (it runs in a user namespace of its own, and the
network namespace belongs to the host's), so it cannot change its address, MAC or routes, nor
open raw sockets to spoof another VM's.

The namespace is named after the VM's host-side device (``tap_name(vm, scope)``): one name says
which deployment and VM both belong to. Names are bind mounts under ``/run/netns`` (the
``ip netns`` convention), so they outlive the reconciler with the process they serve, and a
restarted reconciler finds them again; a reboot clears them together with the processes.
Every call is idempotent: a reconciler resuming after a crash repeats whatever step it was in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyroute2.netns
from pyroute2 import NetlinkError, NetNS

from reconciler.errors import NetworkError
from runtime.network.links import Links

NETNS_DIR = Path("/run/netns")
GUEST_IFNAME = "eth0"
# What tap_name() produces: the name becomes a path under /run/netns, so nothing that could
# climb out of it (no "/", no leading "."), whatever a manifest's VM name holds.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")


def namespace_path(name: str) -> Path:
    """Where the named network namespace ``name`` is mounted (what ``nsenter --net=`` takes)."""
    if not _NAME.fullmatch(name):
        raise NetworkError(f"invalid network namespace name {name!r}")
    return NETNS_DIR / name


def namespaces(prefix: str) -> list[str]:
    """The named network namespaces whose names start with ``prefix`` and could be a VM's
    (others, however named, are not this module's to touch)."""
    return sorted(
        name
        for name in pyroute2.netns.listnetns()
        if name.startswith(prefix) and _NAME.fullmatch(name)
    )


@contextmanager
def _inside(name: str) -> Iterator[Any]:
    # flags=0: pyroute2 would otherwise create a missing namespace, which would hide a bug.
    ipr: Any = NetNS(name, flags=0)
    try:
        yield ipr
    except NetlinkError as exc:
        raise NetworkError(
            f"netlink in namespace {name}: {exc.args[-1] if exc.args else exc}"
        ) from exc
    finally:
        ipr.close()


def ensure_vm_namespace(
    links: Links, name: str, *, bridge: str, address: str, gateway: str, mac: str
) -> None:
    """Make namespace ``name`` hold a VM at ``address`` ("10.88.0.5/24") with ``mac``, on a veth
    pair whose host end (also called ``name``) is a port of ``bridge`` in ``links``' namespace."""
    namespace_path(name)  # validates the name before anything is created
    try:
        if name not in pyroute2.netns.listnetns():
            pyroute2.netns.create(name)
    except OSError as exc:
        raise NetworkError(f"cannot create network namespace {name}: {exc}") from exc
    with _inside(name) as ns:
        guest = ns.link_lookup(ifname=GUEST_IFNAME)
    if not guest or links.kind_of(name) != "veth":
        # A TAP left by a runtime this VM used before, or half a pair (a crash between two
        # steps, a namespace removed by hand): start the pair again from nothing.
        if guest:
            with _inside(name) as ns:
                ns.link("del", index=guest[0])
        links.delete(name)
        links.add_veth(name, peer=GUEST_IFNAME, peer_netns=name)
    links.enslave(name, bridge)
    ip, prefixlen = address.split("/")
    with _inside(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        index = ns.link_lookup(ifname=GUEST_IFNAME)[0]
        link = ns.get_links(index)[0]
        if str(link.get_attr("IFLA_ADDRESS")).lower() != mac.lower():
            ns.link("set", index=index, state="down")
            ns.link("set", index=index, address=mac)
        for old in ns.get_addr(index=index, family=2):
            if (old.get_attr("IFA_ADDRESS"), old["prefixlen"]) != (ip, int(prefixlen)):
                ns.addr("del", index=index, address=old.get_attr("IFA_ADDRESS"),
                        prefixlen=old["prefixlen"])  # fmt: skip
        if not ns.get_addr(index=index, family=2, address=ip):
            ns.addr("add", index=index, address=ip, prefixlen=int(prefixlen))
        ns.link("set", index=index, state="up")
        ns.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index)


def remove_vm_namespace(name: str) -> bool:
    """Remove namespace ``name`` (its veth pair goes with it once no process holds it); True
    when there was one."""
    path = namespace_path(name)
    if not os.path.exists(path):
        return False
    try:
        pyroute2.netns.remove(name)
    except OSError as exc:
        raise NetworkError(f"cannot remove network namespace {name}: {exc}") from exc
    return True
