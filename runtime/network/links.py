"""Bridges and TAP devices with pyroute2, optionally inside a named network namespace.

Every call is idempotent (ensure/delete), because a reconciler resuming after a crash repeats
whatever step it was in. pyroute2's ``NetlinkError`` becomes a one-line ``NetworkError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

from reconciler.errors import NetworkError

TAP_PREFIX = "rc"
IFNAMSIZ = 15


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


class Links:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        ipr: Any = NetNS(self.netns) if self.netns else IPRoute()
        try:
            yield ipr
        except NetlinkError as exc:
            raise NetworkError(f"netlink: {exc.args[-1] if exc.args else exc}") from exc
        finally:
            ipr.close()

    @staticmethod
    def _index(ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def ensure_bridge(self, name: str, gateway: str, prefixlen: int) -> None:
        with self._ipr() as ipr:
            index = self._index(ipr, name)
            if index is None:
                ipr.link("add", ifname=name, kind="bridge")
                index = self._index(ipr, name)
            assert index is not None
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
            if index is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
                index = self._index(ipr, name)
            assert index is not None
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
