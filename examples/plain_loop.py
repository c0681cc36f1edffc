"""A plain PyTorch training loop in one process: the starting point of mpidl_loop.py.

    mpidl data synth tabular --out data/example.h5 --rows 20000 --features 16 --classes 4 --rule nonlinear
    python examples/plain_loop.py data/example.h5
"""
import sys

import h5py
import torch
from torch import nn

from net import Net


def main(path: str) -> None:
    torch.manual_seed(0)
    with h5py.File(path, "r") as f:
        data = torch.utils.data.TensorDataset(torch.from_numpy(f["x"][:]), torch.from_numpy(f["y"][:]))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    model = Net(features=16, classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(5):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/example.h5")
