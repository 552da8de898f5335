"""Bridges, TAP devices and veth pairs with pyroute2, optionally inside a named network namespace.

A QEMU or Firecracker VM is a TAP device on the fleet bridge; a host-process VM is the host end
of a veth pair whose other end lives in the VM's own network namespace (``netns``). Both carry
the same name (``tap_name``), so the firewall and orphan cleanup treat them alike. Every call is
idempotent (ensure/delete), because a reconciler resuming after a crash repeats whatever step it
was in. pyroute2's ``NetlinkError`` becomes a one-line ``NetworkError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

from reconciler.errors import NetworkError

TAP_PREFIX = "rc"
IFNAMSIZ = 15
OWNER_ALIAS = "reconciler:fleet-bridge"
"""The interface alias (``ip link show`` prints it) of every bridge reconciler created."""


def scope_for(owner: str) -> str:
    """A 4-character tag of whoever owns the TAP devices (a state directory), so that two
    deployments on one host never fight over ``web-0``'s device."""
    return hashlib.sha256(owner.encode()).hexdigest()[:4]


def tap_name(vm: str, scope: str = "") -> str:
    """A stable interface name of at most 15 characters for ``vm``'s TAP device."""
    prefix = f"{TAP_PREFIX}{scope}-"
    if len(prefix) + len(vm) <= IFNAMSIZ:
        return f"{prefix}{vm}"
    digest = hashlib.sha256(vm.encode()).hexdigest()[:4]
    return f"{prefix}{vm[: IFNAMSIZ - len(prefix) - 5]}-{digest}"


@contextmanager
def netlink(netns: str | None, *, create: bool = True) -> Iterator[Any]:
    """A netlink socket in ``netns`` (the host's own namespace when None), closed on exit; a
    kernel refusal becomes one ``NetworkError`` line. ``create``: a missing namespace is made
    (pyroute2's default), else it is an error."""
    ipr: Any = (NetNS(netns) if create else NetNS(netns, flags=0)) if netns else IPRoute()
    try:
        yield ipr
    except NetlinkError as exc:
        raise NetworkError(f"netlink: {exc.args[-1] if exc.args else exc}") from exc
    finally:
        ipr.close()


class Links:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _ipr(self) -> AbstractContextManager[Any]:
        return netlink(self.netns)

    @staticmethod
    def _index(ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def ensure_bridge(self, name: str, gateway: str, prefixlen: int) -> None:
        """The fleet bridge, created and marked as ours (``OWNER_ALIAS``) if missing.

        An existing interface of that name that reconciler did not create is refused: the
        bridge name comes from the fleet repository, and an address and ports added to a host
        interface (``eth0``, another tool's bridge) would take over the host's networking."""
        with self._ipr() as ipr:
            index = self._index(ipr, name)
            if index is None:
                ipr.link("add", ifname=name, kind="bridge")
                index = self._index(ipr, name)
                assert index is not None
                ipr.link("set", index=index, ifalias=OWNER_ALIAS)
            else:
                alias = ipr.get_links(index)[0].get_attr("IFLA_IFALIAS")
                if not str(alias or "").startswith(OWNER_ALIAS):
                    raise NetworkError(
                        f"interface {name} exists but reconciler did not create it (its alias "
                        f"is {alias!r}, not {OWNER_ALIAS!r}); refusing to touch it: choose "
                        "another spec.network.bridge, or delete the interface (if an older "
                        f"reconciler made it: ip link set {name} alias {OWNER_ALIAS})"
                    )
            addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if gateway not in addresses:
                ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")

    def delete(self, name: str) -> None:
        with self._ipr() as ipr:
            index = self._index(ipr, name)
            if index is not None:
                ipr.link("del", index=index)

    def ensure_tap(self, name: str, bridge: str) -> None:
        with self._ipr() as ipr:
            master = self._index(ipr, bridge)
            if master is None:
                raise NetworkError(f"bridge {bridge} does not exist; create it first")
            index = self._index(ipr, name)
            if index is not None and self._kind(ipr, index) != "tun":
                # The veth of this VM when it ran as a host process: QEMU cannot open that.
                ipr.link("del", index=index)
                index = None
            if index is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
                index = self._index(ipr, name)
            assert index is not None
            ipr.link("set", index=index, master=master, state="up")

    @staticmethod
    def _kind(ipr: Any, index: int) -> str | None:
        info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind) if kind is not None else None

    def kind_of(self, name: str) -> str | None:
        """The link's kind ("tun", "veth", "bridge", ...), or None when it does not exist."""
        with self._ipr() as ipr:
            index = self._index(ipr, name)
            return None if index is None else self._kind(ipr, index)

    def add_veth(self, name: str, *, peer: str, peer_netns: str) -> None:
        """A veth pair: ``name`` here, ``peer`` in the named namespace ``peer_netns``."""
        with self._ipr() as ipr:
            ipr.link(
                "add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_netns}
            )

    def enslave(self, name: str, bridge: str) -> None:
        """Make ``name`` an up port of ``bridge``."""
        with self._ipr() as ipr:
            master = self._index(ipr, bridge)
            if master is None:
                raise NetworkError(f"bridge {bridge} does not exist; create it first")
            index = self._index(ipr, name)
            if index is None:
                raise NetworkError(f"link {name} does not exist")
            ipr.link("set", index=index, master=master, state="up")

    def names(self, prefix: str = TAP_PREFIX + "-") -> list[str]:
        with self._ipr() as ipr:
            names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        return sorted(str(n) for n in names if n and str(n).startswith(prefix))

    def master_of(self, name: str) -> str | None:
        with self._ipr() as ipr:
            index = self._index(ipr, name)
            if index is None:
                return None
            master = ipr.get_links(index)[0].get_attr("IFLA_MASTER")
            if master is None:
                return None
            return str(ipr.get_links(master)[0].get_attr("IFLA_IFNAME"))
