"""`mpidl …` — thin: parses arguments, calls the library, maps errors to exit codes."""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from typing import Optional

from mpidl.errors import EXIT_BAD_INPUT, BadInput, Fault


def cmd_info(args: argparse.Namespace) -> int:
    import mpidl
    from mpidl import net

    world = mpidl.init()
    iface = net.chosen()
    row = {**world.as_dict(), "net": f"{iface.name} {iface.address}" if iface else None}
    rows = world.comm.gather(row, root=0)
    if world.rank == 0:
        for row in rows:
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mpidl import doctor

    results = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_json(results), indent=2))
    else:
        print(doctor.render(results))
    return 0 if doctor.healthy(results) else 1


def cmd_net(args: argparse.Namespace) -> int:
    import os
    import shlex

    from mpidl import net

    if args.export:
        for k, v in net.launcher_env().items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    spec = os.environ.get(net.VAR, "")
    ifaces = net.interfaces()
    chosen = net.select(spec, ifaces) if spec else None
    report = {
        net.VAR: spec or None,
        "interface": chosen.name if chosen else None,
        "address": chosen.address if chosen else None,
        "rank_env": net.rank_env(spec, chosen, os.environ) if chosen else {},
        "launcher_env": net.launcher_env(),
        "interfaces": [f"{i.name} {i.address}/{i.prefix}" for i in ifaces],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpidl", description="Data-parallel PyTorch training on HPC clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="each rank's World (and its MPIDL_NET interface), printed by rank 0 in rank order")
    s.add_argument("--json", action="store_true", help="one JSON object per rank")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("doctor", help="check the stack: torch, MPI, Horovod, h5py, submitit, SLURM")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("net", help="the network between nodes this host would use (MPIDL_NET), and the "
                                   "variables mpidl sets for OpenMPI, Gloo and NCCL")
    s.add_argument("--json", action="store_true")
    s.add_argument("--export", action="store_true",
                   help="print `export` lines for the launcher (mpirun's interface and keepalive)")
    s.set_defaults(func=cmd_net)

    from mpidl.check.cli import register as register_check
    from mpidl.data.cli import register as register_data
    from mpidl.install.cli import register as register_install
    from mpidl.quant.cli import register as register_quantize
    from mpidl.scaling.cli import register as register_scaling
    from mpidl.slurm.cli import register as register_slurm
    from mpidl.sweep.cli import register as register_sweep
    from mpidl.train.cli import register as register_train

    register_data(sub)
    register_train(sub)
    register_slurm(sub)
    register_scaling(sub)
    register_quantize(sub)
    register_sweep(sub)
    register_install(sub)
    register_check(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = argv_all = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is a command for the subcommand to run (`mpidl submit -- CMD`).
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if "--" in argv_all:
        if not hasattr(args, "program"):
            print(f"error: mpidl {args.command}: takes no command after --", file=sys.stderr)
            return EXIT_BAD_INPUT
        args.program = command
    return dispatch(args)


def entry() -> int:
    """The `mpidl` command as a process of its own (the console script, `python -m mpidl.cli`)."""
    from mpidl import startup

    startup.claim()
    return main()


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command; errors to exit codes (`mpidl check`'s ranks come in here too)."""
    if not faulthandler.is_enabled():  # a rank killed by a signal (SIGBUS on a mapped file) shows its stack
        faulthandler.enable()
    try:
        return int(args.func(args) or 0)
    except BadInput as e:
        from mpidl.world import current, report_and_abort

        world = current()
        if world is None:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        report_and_abort(world, e)
    except SystemExit as e:
        # A rank leaving with an error while others may sit in a collective: end them all.
        from mpidl.world import current

        world = current()
        code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
        if code and world is not None and world.size > 1:
            world.abort(code)
        raise
    except BaseException as e:
        from mpidl.world import current, report_and_abort

        world = current()
        if world is None and isinstance(e, Fault):  # a command without ranks (setup): one line too
            print(f"error: {e}", file=sys.stderr)
            return 1
        if world is None:
            raise
        report_and_abort(world, e)
    return 1


if __name__ == "__main__":
    sys.exit(entry())
