"""Which network the ranks talk over, and how soon a lost node ends the job: one place.

`MPIDL_NET` names the network between nodes, as an interface (`ib0`) or a subnet
(`10.1.0.0/16`; each node then uses its own interface in it, whatever its name). Every rank turns
it, before MPI starts, into the variable each library reads, unless that variable is already
set (the user's setting wins):

    OMPI_MCA_btl_tcp_if_include   OpenMPI's data between nodes (the subnet or the interface)
    GLOO_SOCKET_IFNAME            DDP on CPU: this node's interface on that network
    NCCL_SOCKET_IFNAME            DDP on GPU: NCCL's bootstrap and socket transport

Without `MPIDL_NET`, OpenMPI picks its interfaces itself and DDP, across nodes, points Gloo
and NCCL at the interface each node uses to reach rank 0's rendezvous address (never loopback:
`rendezvous_address`).

A launcher's own daemons read their settings before any rank runs; `launcher_env()` (shown by
`mpidl net --export`) gives mpirun's: the control channel's interface and TCP keepalive,
so that mpirun notices a node that went silent (default OpenMPI: 300 s + 9 × 20 s).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional, Sequence

from mpidl.errors import BadInput

VAR = "MPIDL_NET"
# mpirun's control channel: idle 20 s, then 4 probes 5 s apart -> a silent node is lost after ~40 s.
KEEPALIVE = {"time": 20, "intvl": 5, "probes": 4}


@dataclass(frozen=True)
class Interface:
    name: str
    address: str   # IPv4
    prefix: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefix}").network

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback


def interfaces() -> list[Interface]:
    """This host's up interfaces with an IPv4 address (each interface's primary address)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), 0x8913, req)[16:18])[0]  # SIOCGIFFLAGS
                if not flags & 1:  # IFF_UP
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, req)[20:24])  # SIOCGIFNETMASK
            except OSError:
                continue  # no IPv4 address
            found.append(Interface(name, addr, ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen))
    return found


def select(spec: str, ifaces: Sequence[Interface]) -> Interface:
    """The interface `spec` (a name or a subnet) means on this host (pure)."""
    try:
        net: Optional[ipaddress.IPv4Network] = ipaddress.IPv4Network(spec, strict=False) if "/" in spec else None
    except ValueError:
        raise BadInput(f"{VAR}={spec}: not an interface name or an IPv4 subnet like 10.1.0.0/16") from None
    for i in ifaces:
        if (net is not None and ipaddress.IPv4Address(i.address) in net) or i.name == spec:
            return i
    have = ", ".join(f"{i.name} {i.address}/{i.prefix}" for i in ifaces) or "none"
    raise BadInput(f"{VAR}={spec}: no interface of {socket.gethostname()} is "
                   f"{'in that subnet' if net is not None else 'named so'} (it has: {have})")


def rank_env(spec: str, chosen: Interface, env: Mapping[str, str]) -> dict[str, str]:
    """The variables a rank sets for `MPIDL_NET=spec`, leaving alone those already set (pure)."""
    wanted = {
        "OMPI_MCA_btl_tcp_if_include": spec,
        "GLOO_SOCKET_IFNAME": chosen.name,
        "NCCL_SOCKET_IFNAME": "=" + chosen.name,  # '=': exactly this name, not every name it prefixes
    }
    return {k: v for k, v in wanted.items() if k not in env}


_chosen: Optional[Interface] = None


def apply(environ: MutableMapping[str, str] = os.environ) -> Optional[Interface]:
    """Set this rank's network variables from MPIDL_NET (call before MPI starts)."""
    global _chosen
    spec = environ.get(VAR, "").strip()
    if not spec:
        return None
    _chosen = select(spec, interfaces())
    environ.update(rank_env(spec, _chosen, environ))
    return _chosen


def chosen() -> Optional[Interface]:
    """The interface `apply` chose for this process (None without MPIDL_NET)."""
    return _chosen


def launcher_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What mpirun itself should be given: its daemons' interface (from MPIDL_NET) and keepalive."""
    out = {f"OMPI_MCA_oob_tcp_keepalive_{k}": str(v) for k, v in KEEPALIVE.items()}
    spec = env.get(VAR, "").strip()
    if spec:
        out["OMPI_MCA_oob_tcp_if_include"] = spec
        out["OMPI_MCA_btl_tcp_if_include"] = spec
    return {k: v for k, v in out.items() if k not in env}


def _is_loopback(address: str) -> bool:
    return ipaddress.IPv4Address(address).is_loopback


def rendezvous_address(across_nodes: bool, env: Mapping[str, str] = os.environ) -> str:
    """An address of this host that the other ranks can reach.

    On one node, loopback. Across nodes, in this order: MPIDL_NET's interface, Gloo's or NCCL's
    interface if the user named one, the host name if it resolves to a non-loopback address,
    else the first non-loopback interface. Never loopback: a host name resolving to 127.0.1.1
    (Debian's /etc/hosts) would send every other node to itself.
    """
    if not across_nodes:
        return "127.0.0.1"
    ifaces = interfaces()
    spec = env.get(VAR, "").strip()
    if spec:
        return select(spec, ifaces).address
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = env.get(key, "").lstrip("=^").split(",")[0]
        named = [i for i in ifaces if i.name == name]
        if named:
            return named[0].address
    try:
        resolved = socket.gethostbyname(socket.gethostname())
        if not _is_loopback(resolved):
            return resolved
    except OSError:
        pass
    outside = [i for i in ifaces if not i.loopback]
    if not outside:
        raise BadInput(f"{socket.gethostname()} has no network address but loopback, and the job spans "
                       f"several nodes: set {VAR} to the interface or subnet between them")
    return outside[0].address


def interface_towards(address: str) -> str:
    """The name of the interface this host sends from to reach `address` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # a UDP connect only asks the routing table
        source = s.getsockname()[0]
    for i in interfaces():
        if i.address == source:
            return i.name
    raise OSError(f"no interface holds {source}, the source address towards {address}")
