"""Scaling studies: run a job at many sizes and backends, compare with what the machine allows
(a no-communication baseline), predict beyond, and report.

    study.py       the study's YAML schema and the checks made before anything runs
    launch.py      how a study starts ranks (mpirun now; a batch launcher plugs in the same way)
    runner.py      runs every point, in an interleaved order, into one study.json
    efficiency.py  speedup, efficiency, the baseline's limit, communication share (pure arithmetic)
    model.py       allreduce and step-time model, presets, Amdahl/Gustafson fits (pure arithmetic)
    report.py      plots, Markdown and a self-contained HTML page from a study folder
    environment.py what the study records about the machine and the software stack
"""
