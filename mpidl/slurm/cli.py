"""`mpidl submit JOB.yaml [--set ...] [--wait] [--dry-run] [--standalone] [--array ...]`."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_submit(args: argparse.Namespace) -> int:
    from mpidl.slurm import submit, watch

    cwd = Path.cwd()
    prepared = submit.prepare(args.job, args.set, array=args.array, standalone_script=args.standalone, cwd=cwd,
                              resume=args.resume, overwrite=args.overwrite)
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
    s = sub.add_parser("submit", help="submit a job spec to SLURM (through submitit, or a plain sbatch script)",
                       description="Submit JOB.yaml to SLURM with the resources of its slurm: section. "
                                   "Exit status: 0; 2 for bad input (the job's own, with --wait); 1 otherwise.")
    s.add_argument("job", help="YAML job spec, e.g. jobs/demo.yaml")
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
    s.set_defaults(func=cmd_submit)
