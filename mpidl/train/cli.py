"""`mpidl train JOB.yaml [--set key.path=value ...] [--resume]`."""
from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from mpidl import preemption

    preemption.arm()  # from the first moment: a warning signal during set-up is kept, not fatal
    from mpidl.spec import load_spec
    from mpidl.train.job import run_job

    world, spec, summary, code = run_job(
        lambda: load_spec(args.job, args.set), stop_at=args.stop_at, overwrite=args.overwrite,
        resume=preemption.resume_mode(args.resume) if args.requeue else args.resume,
        requeue_with=lambda spec: preemption.scontrol_requeue() if args.requeue else None,
        callbacks=getattr(args, "callbacks", ()), bound_restarts=args.requeue)  # `mpidl check` adds its probe
    if code or summary.get("preempted"):
        return code
    if args.require_target and summary["reached_target"] is False:
        if world.rank == 0:
            print(f"target accuracy {spec.target_accuracy} not reached: {summary['final']}")
        return 1
    return 0


def register(sub) -> None:
    s = sub.add_parser("train", help="train a job spec (under mpirun, srun, or alone)")
    s.add_argument("job", help="YAML job spec, e.g. jobs/demo.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field, e.g. --set optimizer.lr=0.05 --set backend=mpi")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (error if none)")
    s.add_argument("--overwrite", action="store_true",
                   help="start afresh even where the run folder holds an earlier run's checkpoints (they are removed)")
    s.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="leave after this optimizer step with a checkpoint, as if preempted (resume continues)")
    s.add_argument("--requeue", action="store_true",
                   help="in an sbatch job: on preemption, requeue it (up to slurm.requeue_limit); once "
                        "requeued, resume from the newest checkpoint by itself")
    s.add_argument("--require-target", action="store_true",
                   help="exit 1 when the spec's target_accuracy is not reached")
    s.set_defaults(func=cmd_train)
