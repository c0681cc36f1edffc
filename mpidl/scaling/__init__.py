"""Scaling studies: run a job at many sizes, placements and backends, compare with what the
machine allows (a no-communication baseline) and with one node, predict beyond, and report.

    study.py       the study's YAML schema and the checks made before anything runs
    launch.py      how a study starts ranks: mpirun here, or one SLURM job per point on n nodes
    runner.py      runs every point, in an interleaved order, into one study.json
    efficiency.py  speedup, efficiency, the baseline's limit, communication share, crossing nodes
                   (pure arithmetic)
    model.py       allreduce and step-time model, presets, Amdahl/Gustafson fits (pure arithmetic)
    report.py      plots, Markdown and a self-contained HTML page from a study folder
    environment.py what the study records about the machine and the software stack
"""
