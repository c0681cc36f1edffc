"""`mpidl submit JOB.yaml [--set ...] [--wait] [--dry-run] [--standalone] [--array ...]`, and
`mpidl submit [RESOURCES.yaml] [flags] -- CMD ...` for any command."""
from __future__ import annotations

import argparse
from pathlib import Path

from mpidl.errors import BadInput

# flag -> slurm key: the resources most jobs set (the rest: --set slurm.KEY=VALUE)
FLAGS = {"nodes": "nodes", "tasks_per_node": "tasks_per_node", "gpus_per_node": "gpus_per_node",
         "cpus_per_task": "cpus_per_task", "mem": "mem", "time": "time", "partition": "partition",
         "account": "account", "qos": "qos"}


def cmd_submit(args: argparse.Namespace) -> int:
    from mpidl.slurm import submit, watch

    cwd = Path.cwd()
    flags = {k: getattr(args, k) for k in (*FLAGS, "name", "output")}
    if args.program is not None:  # mpidl submit [RESOURCES.yaml] [flags] -- CMD ...
        from mpidl.slurm import command

        if args.resume or args.overwrite:
            raise BadInput("mpidl submit -- CMD: --resume and --overwrite are for job specs (your script decides)")
        prepared, runs = command.prepare(args.job, flags, args.set, args.program, array=args.array, cwd=cwd,
                                         venv=None)
        if args.dry_run:
            return submit.dry_run(prepared, cwd)
        jobs = command.submit(prepared, runs, cwd)
    else:
        if args.job is None:
            raise BadInput("mpidl submit: give a job spec (JOB.yaml), or a command after `--`")
        sets = [f"slurm.{FLAGS[k]}={v}" for k, v in flags.items() if k in FLAGS and v is not None]
        sets += [f"{k}={v}" for k in ("name", "output") if (v := flags[k]) is not None]
        prepared = submit.prepare(args.job, sets + list(args.set), array=args.array,
                                  standalone_script=args.standalone, cwd=cwd, resume=args.resume,
                                  overwrite=args.overwrite)
        if args.dry_run:
            return submit.dry_run(prepared, cwd)
        jobs = submit.submit(prepared, cwd)
    submit.describe(jobs, prepared)
    if not args.wait:
        return 0
    outs = watch.wait(jobs, follow=not prepared.variants)
    if prepared.variants:
        print(watch.table(jobs, outs))
        for job, out in zip(jobs, outs):
            if out.error:
                print(f"{job.job_id}: {out.error}")
        return watch.worst(outs)
    watch.report(jobs[0], outs[0])
    return outs[0].exit_code


def register(sub) -> None:
    s = sub.add_parser("submit", help="submit a job spec, or any command (-- CMD), to SLURM",
                       usage="mpidl submit JOB.yaml [options]\n"
                             "       mpidl submit [RESOURCES.yaml] [options] -- CMD ...",
                       description="Submit JOB.yaml to SLURM with the resources of its slurm: section (through "
                                   "submitit, or as a plain sbatch script), or any command: every rank runs CMD, "
                                   "with the resources of RESOURCES.yaml's slurm: section, the flags below and "
                                   "--set slurm.KEY=VALUE. Exit status: 0; 2 for bad input (the job's own, with "
                                   "--wait); 1 otherwise.")
    s.add_argument("job", nargs="?", help="YAML job spec, e.g. jobs/demo.yaml; with a command: a YAML file "
                                          "holding a slurm: section (optional)")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field, e.g. --set slurm.nodes=4 --set optimizer.lr=0.05")
    s.add_argument("--wait", action="store_true",
                   help="follow rank 0's log until the job ends; exit with its result (0, 2 bad input, 1 otherwise)")
    s.add_argument("--dry-run", action="store_true",
                   help="write the exact script to slurm/generated/<name>.sbatch and ask sbatch --test-only")
    s.add_argument("--standalone", action="store_true",
                   help="a plain sbatch script (no pickles): srun --mpi=pmix <venv>/bin/mpidl train JOB.yaml ...")
    s.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...|@FILE",
                   help="one array element per value (several: every combination), or per line of FILE")
    s.add_argument("--resume", action="store_true", help="the job continues from the newest checkpoint")
    s.add_argument("--overwrite", action="store_true",
                   help="the job starts afresh even where the run folder holds an earlier run's checkpoints")
    for flag, key in FLAGS.items():
        s.add_argument("--" + flag.replace("_", "-"), default=None, metavar=key.upper().split("_")[0],
                       help=f"slurm.{key}")
    s.add_argument("--name", default=None, help="the job's name (default: the spec's; a command's script name)")
    s.add_argument("--output", default=None, help="the run folder (default runs/{name}): logs, and with a spec the run")
    s.set_defaults(func=cmd_submit, program=None)
