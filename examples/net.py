"""The model of the examples: yours, in your own module (nothing of mpidl in it)."""
from torch import nn


class Net(nn.Module):
    def __init__(self, features: int = 16, classes: int = 4, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, classes))

    def forward(self, x):
        return self.layers(x)
