"""Callbacks: what a workload adds to the loop without a branch in it.

The trainer calls each hook of each callback in order. Hooks receive the Trainer, whose
attributes (model, optimizer, backend, world, spec, position) are theirs to read and use.

    on_start(trainer)              set up, before the first step of this run
    after_sync(trainer)            gradients averaged over ranks, before the optimizer step
                                   (gradient clipping belongs here: every rank sees the same)
    after_step(trainer)            parameters updated (weight clipping belongs here)
    on_record(trainer, record)     a metrics record (training window or evaluation) about to
                                   be written; add keys to it
    on_end(trainer, summary)       the run's summary about to be written; add keys to it
"""
from __future__ import annotations


class Callback:
    def on_start(self, trainer) -> None:
        pass

    def after_sync(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def on_record(self, trainer, record: dict) -> None:
        pass

    def on_end(self, trainer, summary: dict) -> None:
        pass
