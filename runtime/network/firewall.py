"""Traffic rules between VMs, and NAT for the pool, with nftables.

Rules are generated as text (pure, golden-tested) and loaded atomically with ``nft -f -``:

* ``bridge <table>``: traffic between two VMs on the fleet bridge (TAPs of microVMs, veths of
  host processes) is dropped unless both run the same workload, or one declares the other in
  ``dependsOn``. Only IPv4 and ARP cross between VMs: the rules judge IPv4 addresses, and an
  IPv6 link-local address (which every guest kernel gives itself) would otherwise walk around
  them. The rules are stateless (bridge
  conntrack needs ``nf_conntrack_bridge``, which hosts may lack), so a declared dependency opens
  both directions. Traffic between the host and its VMs does not cross the bridge's forward hook
  and is not affected.
* ``ip <table>-routed``: the same rule for traffic the host *routes* between the pool's
  addresses, which never crosses a bridge's forward hook: in a fleet of hosts (host-gateway
  model, ``routes``), a VM reaches a VM of another host through both hosts' IP forwarding.
  ``addresses`` are then the whole fleet's, every host's VMs, so each host judges both ends
  of a packet whichever host they run on, and a packet is judged on the host it leaves and
  on the host it enters. Stateless too, for the same answer as on the bridge.
* ``ip <table>-nat`` (when the fleet sets ``nat: true``): VM traffic leaving the pool is
  masqueraded.

Each load replaces the whole tables, so the rules always match the current fleet. Tables are
named per deployment (``table``), so two fleets on one host keep their own rules.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

from reconciler.errors import NetworkError, ToolMissingError


def _set(addresses: Sequence[str]) -> str:
    return "{ " + ", ".join(sorted(addresses)) + " }"


def firewall_rules(
    tap_prefix: str,
    cidr: str,
    addresses: Mapping[str, Sequence[str]],
    depends_on: Mapping[str, Sequence[str]],
    *,
    nat: bool,
    table: str = "reconciler",
) -> str:
    """``addresses``: workload -> its VMs' addresses (in a fleet of hosts, on every host);
    ``depends_on``: workload -> workloads it may reach (and, the rules being stateless, be
    reached from)."""
    allowed = _allowed(addresses, depends_on)
    lines = [
        f"table bridge {table}",
        f"delete table bridge {table}",
        f"table bridge {table} {{",
        "    chain forward {",
        "        type filter hook forward priority 0; policy accept;",
        # Only frames entering from this fleet's TAP devices are judged.
        f'        iifname != "{tap_prefix}*" accept',
        "        ether type != { ip, arp } drop",
    ]
    lines += allowed
    lines += [
        f"        ip saddr {cidr} ip daddr {cidr} drop",
        "    }",
        "}",
        f"table ip {table}-routed",
        f"delete table ip {table}-routed",
        f"table ip {table}-routed {{",
        "    chain forward {",
        "        type filter hook forward priority 0; policy accept;",
        # Only traffic from the pool to the pool is judged: the host's own, the underlay's
        # and NATed traffic to the outside pass as before.
        f"        ip saddr != {cidr} accept",
        f"        ip daddr != {cidr} accept",
        *allowed,
        "        drop",
        "    }",
        "}",
        f"table ip {table}-nat",
        f"delete table ip {table}-nat",
    ]
    if nat:
        lines += [
            f"table ip {table}-nat {{",
            "    chain postrouting {",
            "        type nat hook postrouting priority 100; policy accept;",
            f"        ip saddr {cidr} ip daddr != {cidr} masquerade",
            "    }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _allowed(
    addresses: Mapping[str, Sequence[str]], depends_on: Mapping[str, Sequence[str]]
) -> list[str]:
    """The accept rules, the same for bridged and routed traffic: a workload's own VMs, and
    each declared dependency in both directions."""
    lines = []
    for workload in sorted(addresses):
        own = addresses[workload]
        if not own:
            continue
        lines.append(f"        ip saddr {_set(own)} ip daddr {_set(own)} accept")
        reachable = [
            a for dep in sorted(depends_on.get(workload, ())) for a in addresses.get(dep, ())
        ]
        if reachable:
            lines.append(f"        ip saddr {_set(own)} ip daddr {_set(reachable)} accept")
            lines.append(f"        ip saddr {_set(reachable)} ip daddr {_set(own)} accept")
    return lines


def load_rules(rules: str, *, netns: str | None = None) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise ToolMissingError("nft", "install it with `apt-get install nftables`")
    argv = [nft, "-f", "-"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    result = subprocess.run(argv, input=rules, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise NetworkError(f"nftables refused the fleet's rules: {reason}")
