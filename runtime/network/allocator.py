"""VM addresses from the fleet's pool, persisted in the state database.

One row per VM: the same VM always gets the same address and MAC back (a restart or a restarted
daemon must not renumber the fleet), an address is never handed out twice, and a deleted VM's
address returns to the pool. The gateway is the pool's first host address (the bridge).

The pool is never materialised: a free address is the lowest host number not in use, found by
walking the addresses in use (what the table holds), so a /16 costs what its VMs cost.
"""

from __future__ import annotations

import hashlib
import ipaddress
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import NetworkError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS addresses (
    vm TEXT PRIMARY KEY,
    workload TEXT NOT NULL,
    address TEXT NOT NULL UNIQUE,
    mac TEXT NOT NULL UNIQUE
);
"""


@dataclass(frozen=True)
class Lease:
    vm: str
    workload: str
    address: str  # with prefix, "10.88.0.5/24"
    mac: str
    gateway: str


def mac_for(vm: str, salt: int = 0) -> str:
    digest = hashlib.sha256(f"{vm}:{salt}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class AddressAllocator:
    def __init__(self, db_path: Path, cidr: str) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr)
        except ValueError as exc:
            raise NetworkError(f"invalid network pool {cidr!r}: {exc}") from exc
        if self.network.prefixlen > 30:
            raise NetworkError(f"network pool {cidr} has no room for VMs; use a /30 or larger")
        base = int(self.network.network_address)
        self.gateway = str(ipaddress.IPv4Address(base + 1))
        # VM addresses: after the gateway, before the broadcast address.
        self._first, self._last = base + 2, int(self.network.broadcast_address) - 1
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise NetworkError(f"cannot open the address table in {db_path}: {exc}") from exc

    def _lease(self, row: tuple[str, str, str, str]) -> Lease:
        vm, workload, address, mac = row
        return Lease(vm, workload, f"{address}/{self.network.prefixlen}", mac, self.gateway)

    def allocate(self, vm: str, workload: str) -> Lease:
        """The VM's address, allocating one the first time (idempotent)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT vm, workload, address, mac FROM addresses WHERE vm = ?", (vm,)
            ).fetchone()
            if row is None:
                used = {r[0] for r in self._db.execute("SELECT address FROM addresses")}
                macs = {r[0] for r in self._db.execute("SELECT mac FROM addresses")}
                free = self._lowest_free(used)
                if free is None:
                    raise NetworkError(
                        f"the network pool {self.network} is exhausted ({len(used)} VMs); "
                        "enlarge the Fleet's spec.network.cidr"
                    )
                salt, mac = 0, mac_for(vm)
                while mac in macs:
                    salt += 1
                    mac = mac_for(vm, salt)
                row = (vm, workload, free, mac)
                self._db.execute("INSERT INTO addresses VALUES (?, ?, ?, ?)", row)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return self._lease(row)

    def _lowest_free(self, used: set[str]) -> str | None:
        taken = set()
        for address in used:
            try:
                taken.add(int(ipaddress.IPv4Address(address)))
            except ValueError:
                continue  # not an address of this pool: it takes nothing from it
        candidate = self._first
        # At most len(taken) + 1 steps: the pool's size never matters.
        while candidate in taken:
            candidate += 1
        return str(ipaddress.IPv4Address(candidate)) if candidate <= self._last else None

    def release(self, vm: str) -> None:
        self._db.execute("DELETE FROM addresses WHERE vm = ?", (vm,))

    def leases(self) -> list[Lease]:
        rows = self._db.execute("SELECT vm, workload, address, mac FROM addresses ORDER BY vm")
        return [self._lease(row) for row in rows]

    def close(self) -> None:
        self._db.close()
