"""Models by name: linear, mlp, small_cnn, resnet18, resnet50, mobilenet_v2, or yours
(`model.name: package.module:attr`, imported by `mpidl.usercode`).

Own definitions of the standard architectures (torchvision from PyPI does not import beside
the CPU torch build used here); parameter counts match torchvision's for 1000 classes.
`small_input=True` gives ResNets the CIFAR stem (3×3 conv, no max-pool) for 32×32 images.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mpidl import usercode
from mpidl.errors import BadInput


def linear(in_features: int, out_features: int = 1) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))


def mlp(in_features: int, num_classes: int = 10, hidden: Sequence[int] = (256, 256)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 3, num_classes: int = 10, width: int = 32) -> nn.Module:
    """Two conv blocks and a linear head: seconds per epoch on CPU for 16×16 to 32×32 images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


# ---------------------------------------------------------------- ResNet
class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3×3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


def _downsample(cin: int, cout: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False):
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch (Goyal et al.)
            if isinstance(m, _Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, _Basic):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    return ResNet(_Basic, (2, 2, 2, 2), num_classes, in_channels, small_input)


def resnet50(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    return ResNet(_Bottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input)


# ---------------------------------------------------------------- MobileNetV2
def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2) -> nn.Module:
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    cin = _divisible(32 * width_mult)
    last = _divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 2)]
    for t, c, n, s in settings:
        cout = _divisible(c * width_mult)
        for i in range(n):
            layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    layers.append(_conv_bn(cin, last, 1, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(last, num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": linear, "mlp": mlp, "small_cnn": small_cnn, "resnet18": resnet18, "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """A model by name; an unknown name or argument is BadInput naming it."""
    if name not in MODELS:
        raise BadInput(f"model.name: unknown model {name!r} (choose from {', '.join(MODELS)})")
    fn = MODELS[name]
    allowed = inspect.signature(fn).parameters
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise BadInput(f"model.args: {name} takes no argument {unknown[0]!r} (it takes: {', '.join(allowed)})")
    missing = [k for k, p in allowed.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise BadInput(f"model.args: {name} needs {missing[0]!r}")
    return fn(**kwargs)


def user_model(spec, source) -> nn.Module:
    """Your model (`model.name: package.module:attr`): the class or factory called with
    model.args, and with the sizes the data tells where it takes them and the spec does not:
    `in_features` (the input's size), `in_channels` (an image's channels), `num_classes` (the
    class count the labels or the spec give)."""
    name = spec.model.name
    fn = usercode.resolve(name, "model.name", spec.code_dirs)
    if not callable(fn):
        raise BadInput(f"model.name: {name}: not a class or a function (a {type(fn).__name__})")
    args = dict(spec.model.args)
    x_shape = source.shapes[source.keys[0]]
    for arg, value in (("in_features", int(np.prod(x_shape))),
                       ("in_channels", x_shape[0] if len(x_shape) == 3 else None)):
        if value is not None and arg not in args and usercode.accepts(fn, arg) and _named(fn, arg):
            args[arg] = value
    model = usercode.call(fn, args, "model.args", name)
    if not isinstance(model, nn.Module):
        raise BadInput(f"model.name: {name}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _named(fn, arg: str) -> bool:
    """Whether `fn` names `arg` itself (not only **kwargs, which may mean something else)."""
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def takes_classes(spec) -> bool:
    """Whether the spec's model takes a class count (a user model: when it names num_classes)."""
    if not usercode.is_target(spec.model.name):
        return True
    return _named(usercode.resolve(spec.model.name, "model.name", spec.code_dirs), "num_classes")


def model_for(spec, source) -> nn.Module:
    """The spec's model, with the sizes it can take from the data filled in."""
    if usercode.is_target(spec.model.name):
        return user_model(spec, source)
    args = dict(spec.model.args)
    x_shape, y_key = source.shapes[source.keys[0]], source.keys[1]
    classify = source.dtypes[y_key].kind in "iu"
    name = spec.model.name
    if name in ("linear", "mlp"):
        args.setdefault("in_features", int(np.prod(x_shape)))
    elif len(x_shape) == 3:
        args.setdefault("in_channels", x_shape[0])
    if classify and spec.data.synth is not None and spec.data.synth.classes and name != "linear":
        args.setdefault("num_classes", spec.data.synth.classes)
    if name == "linear" and not classify:
        args.setdefault("out_features", int(np.prod(source.shapes[y_key] or (1,))))
    return build_model(name, **args)
