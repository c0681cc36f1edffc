"""Linear regression against a known rule: the recovered coefficients' error in the summary.

`mpidl data synth tabular` (and a job's `data.synth`) stores the rule's coefficients with the
targets. A linear model trained on such a file ends with a `coefficients` entry in its
summary: the largest absolute error of the coefficients and of the intercept, the relative
L2 error, and for scale the standard error exact least squares would have on as many rows
(noise / sqrt(rows): on standard normal features each coefficient's estimate varies by that).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch import nn

from mpidl.data.preprocess import Standardizer
from mpidl.train.callbacks import Callback


def linear_layer(model: nn.Module) -> Optional[nn.Linear]:
    """The model's one Linear layer, or None when it has none or several."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return found[0] if len(found) == 1 else None


def recovered(layer: nn.Linear, standardizer: Optional[Standardizer]) -> tuple[np.ndarray, np.ndarray]:
    """The layer's coefficients (features × outputs) and intercepts in the units of the stored
    features (undoing standardization, which the layer saw)."""
    w = layer.weight.detach().to("cpu").double().numpy().T
    b = layer.bias.detach().to("cpu").double().numpy() if layer.bias is not None else np.zeros(w.shape[1])
    if standardizer is not None:
        mean = np.asarray(standardizer.mean, np.float64).reshape(-1)
        std = np.asarray(standardizer.std, np.float64).reshape(-1)
        w = w / std[:, None]
        b = b - mean @ w
    return w, b


class CoefficientReport(Callback):
    def __init__(self, truth: dict, rows: int, standardizer: Optional[Standardizer]):
        self.truth, self.rows, self.standardizer = truth, rows, standardizer

    def on_end(self, trainer, summary: dict) -> None:
        layer = linear_layer(trainer.net)
        if layer is None:
            return
        w, b = recovered(layer, self.standardizer)
        true_w, true_b = self.truth["coef"], self.truth["intercept"]
        if w.shape != true_w.shape:
            return
        err = w - true_w
        summary["coefficients"] = {
            "max_abs_error": float(np.abs(err).max()),
            "rel_error": float(np.linalg.norm(err) / max(float(np.linalg.norm(true_w)), 1e-300)),
            "intercept_max_abs_error": float(np.abs(b - true_b).max()),
            "least_squares_standard_error": self.truth["noise"] / math.sqrt(self.rows),
            "features": int(w.shape[0]), "noise": self.truth["noise"],
        }
        c = summary["coefficients"]
        trainer.log.info("coefficients: max abs error %.2e (relative %.2e), intercept %.2e; least-squares "
                         "standard error %.2e", c["max_abs_error"], c["rel_error"], c["intercept_max_abs_error"],
                         c["least_squares_standard_error"])
