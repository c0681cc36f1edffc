"""mpidl.net: one setting (MPIDL_NET) for OpenMPI, Gloo and NCCL; DDP's rendezvous address.

Across real nodes these are exercised in test_multinode.py; here, this machine's own interfaces.
"""
from __future__ import annotations

import pytest

from conftest import mpidl_cmd, mpirun, pycode
from mpidl import net
from mpidl.errors import BadInput

IFACES = [net.Interface("lo", "127.0.0.1", 8), net.Interface("eth0", "192.0.2.2", 24),
          net.Interface("ib0", "10.1.4.7", 16)]


def test_select_by_name_or_by_subnet():
    assert net.select("ib0", IFACES).address == "10.1.4.7"
    assert net.select("10.1.0.0/16", IFACES).name == "ib0"
    assert net.select("10.1.4.0/24", IFACES).name == "ib0"   # a smaller subnet holding the address
    assert net.select("192.0.2.9/24", IFACES).name == "eth0"  # host bits are ignored
    with pytest.raises(BadInput, match=r"^MPIDL_NET=10\.9\.0\.0/16: no interface of .* is in that subnet "
                                       r"\(it has: lo 127\.0\.0\.1/8, eth0 192\.0\.2\.2/24, ib0 10\.1\.4\.7/16\)"):
        net.select("10.9.0.0/16", IFACES)
    with pytest.raises(BadInput, match="MPIDL_NET=ib1: no interface of .* is named so"):
        net.select("ib1", IFACES)
    with pytest.raises(BadInput, match="MPIDL_NET=10.1/x: not an interface name or an IPv4 subnet"):
        net.select("10.1/x", IFACES)


def test_rank_env_keeps_what_the_user_set():
    ib0 = IFACES[2]
    assert net.rank_env("10.1.0.0/16", ib0, {}) == {
        "OMPI_MCA_btl_tcp_if_include": "10.1.0.0/16", "GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "=ib0"}
    assert net.rank_env("10.1.0.0/16", ib0, {"GLOO_SOCKET_IFNAME": "eth0"}) == {
        "OMPI_MCA_btl_tcp_if_include": "10.1.0.0/16", "NCCL_SOCKET_IFNAME": "=ib0"}


def test_launcher_env():
    base = {"OMPI_MCA_oob_tcp_keepalive_time": "20", "OMPI_MCA_oob_tcp_keepalive_intvl": "5",
            "OMPI_MCA_oob_tcp_keepalive_probes": "4"}
    assert net.launcher_env({}) == base
    assert net.launcher_env({"MPIDL_NET": "ib0", "OMPI_MCA_oob_tcp_keepalive_time": "60"}) == {
        **{k: v for k, v in base.items() if not k.endswith("_time")},
        "OMPI_MCA_oob_tcp_if_include": "ib0", "OMPI_MCA_btl_tcp_if_include": "ib0"}


def test_this_hosts_interfaces_and_routes():
    found = net.interfaces()
    loop = [i for i in found if i.loopback]
    assert loop and loop[0].address == "127.0.0.1"
    assert net.interface_towards("127.0.0.1") == loop[0].name
    assert net.rendezvous_address(across_nodes=False) == "127.0.0.1"
    outside = [i for i in found if not i.loopback]
    if not outside:
        with pytest.raises(BadInput, match="no network address but loopback"):
            net.rendezvous_address(across_nodes=True, env={})
    else:
        addr = net.rendezvous_address(across_nodes=True, env={})
        assert not addr.startswith("127.") and addr in {i.address for i in outside}
        assert net.rendezvous_address(True, {"MPIDL_NET": outside[-1].name}) == outside[-1].address


SHOW_ENV = """
import os, mpidl
w = mpidl.init()
mine = " ".join([str(w.rank), *(os.environ.get(k, "-") for k in ("OMPI_MCA_btl_tcp_if_include",
                                                                  "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"))])
seen = w.comm.gather(mine, root=0)  # one writer: two ranks' lines could interleave
if w.rank == 0:
    for line in seen:
        print(line, flush=True)
"""


def test_ranks_apply_mpidl_net_before_mpi_starts():
    r = mpirun(2, pycode(SHOW_ENV), env={"MPIDL_NET": "127.0.0.0/8", "GLOO_SOCKET_IFNAME": "mine"}, timeout=120)
    assert r.returncode == 0, r.output
    lo = next(i.name for i in net.interfaces() if i.loopback)
    assert r.stdout.splitlines() == [f"0 127.0.0.0/8 mine ={lo}", f"1 127.0.0.0/8 mine ={lo}"]


def test_a_bad_mpidl_net_is_one_line_and_exit_2_on_every_rank():
    r = mpirun(2, mpidl_cmd("info"), env={"MPIDL_NET": "10.254.254.0/24"}, timeout=120)
    assert r.returncode == 2, r.output
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "MPIDL_NET=10.254.254.0/24: no interface of" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "rank=" not in r.stdout
