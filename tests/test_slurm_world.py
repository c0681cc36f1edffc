"""The World under a real SLURM cluster: `srun --mpi=pmix` and `mpirun` inside `sbatch`."""
from __future__ import annotations

import json
import shlex
import time

import pytest

from conftest import PYTHON, ROOT, run, sbatch_wait


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_srun_pmix_world(slurm_cluster):
    # --overcommit: 3 tasks on a 2-core node, to catch even-only assumptions.
    r = run(["srun", "--mpi=pmix", "-n", "3", "--overcommit", PYTHON, "-m", "mpidl.cli", "info", "--json"],
            env=slurm_cluster, timeout=120)
    assert r.returncode == 0, r.output
    rows = _rows(r.stdout)
    assert [row["rank"] for row in rows] == [0, 1, 2]
    assert all(row["size"] == 3 and row["launcher"] == "srun" for row in rows)
    assert sorted(row["local_rank"] for row in rows) == [0, 1, 2]


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
def test_mpirun_inside_sbatch_sees_true_ranks(slurm_cluster, tmp_path):
    # Each rank of mpirun inside a batch script inherits SLURM_PROCID=0; ranks must still be 0 and 1.
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH -n 2\n#SBATCH -o {shlex.quote(str(out))}\n"
        f"cd {shlex.quote(str(ROOT))}\n"
        f"mpirun -np 2 {shlex.quote(PYTHON)} -m mpidl.cli info --json\n"
    )
    _, state = sbatch_wait(script, env=slurm_cluster, timeout=180)
    assert state == "COMPLETED 0:0", state + "\n" + (out.read_text() if out.exists() else "")
    for _ in range(20):  # the output file is flushed by slurmd as the job ends
        if out.exists() and len(_rows(out.read_text())) == 2:
            break
        time.sleep(0.5)
    rows = _rows(out.read_text())
    assert [row["rank"] for row in rows] == [0, 1]
    assert all(row["launcher"] == "mpirun" and row["size"] == 2 for row in rows)


def test_exception_in_one_rank_ends_srun_step(slurm_cluster):
    from test_world import RAISE_IN_RANK1

    r = run(["srun", "--mpi=pmix", "-n", "2", PYTHON, "-c", RAISE_IN_RANK1], env=slurm_cluster, timeout=60)
    assert r.returncode != 0
    assert "unreachable" not in r.stdout
    assert "[rank 1] RuntimeError: boom from rank one" in r.stderr
