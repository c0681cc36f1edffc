"""Scaling studies: run a job at many sizes, placements and backends, compare with what the
machine allows (a no-communication baseline) and with one node, predict beyond, and report.

    study.py       the study's YAML schema and the checks made before anything runs
    launch.py      how a study starts ranks: mpirun here, or one SLURM job per point on n nodes
    runner.py      runs every point, in an interleaved order, into one study.json
    efficiency.py  speedup, efficiency, the baseline's limit, communication share, crossing nodes
                   (pure arithmetic)
    model.py       allreduce and step-time model, presets, Amdahl/Gustafson fits (pure arithmetic)
    report.py      a study folder's report: CSV, prediction.json, and its sections built once
    document.py    the report's neutral structure (headings, paragraphs, tables, figures, notes),
                   rendered to Markdown and to a self-contained HTML page
    plots.py       the report's figures (PNG bytes from the study's JSON)
    summary.py     the report's first screen: how far the job scales, its cost, the model's record
    published.py   published results as data, held against the model
    environment.py what the study records about the machine and the software stack
"""
