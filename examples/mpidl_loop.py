"""The loop of plain_loop.py, data-parallel and preemption-safe with mpidl (diff the two files).

    mpirun -np 4 python examples/mpidl_loop.py data/example.h5
    mpidl submit --nodes 2 --tasks-per-node 4 -- python examples/mpidl_loop.py data/example.h5

Each rank reads its own share of the file, reshuffled every epoch; gradients are averaged by
the backend in MPIDL_BACKEND (horovod, ddp or mpi); the run resumes from its checkpoint in
runs/example when started again, and on SIGUSR2/SIGTERM (SLURM's warning) it checkpoints and
leaves (requeued under `mpidl submit`). Rank 0 writes runs/example/metrics.jsonl and summary.json.
"""
import sys

import torch
from torch import nn

import mpidl
from net import Net


def main(path: str) -> None:
    torch.manual_seed(0)
    world = mpidl.init()
    loader = mpidl.ShardedLoader(mpidl.H5Source(path), world, batch_size=64)
    model = Net(features=16, classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * world.size, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    run = mpidl.Run("runs/example", model, optimizer, loader, epochs=5)
    model, optimizer = run.model, run.optimizer
    for epoch in run.epochs():
        for x, y in run.batches():
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss=loss)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/example.h5")
