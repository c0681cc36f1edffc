"""Models: standard sizes, argument checks, memory formats; backends: true gradient averages."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import has_horovod, mpirun, pycode, results
from mpidl.errors import BadInput
from mpidl.train.models import build_model
from test_train import BACKENDS


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                         ("mobilenet_v2", 3_504_872)])
def test_parameter_counts_match_torchvision(name, params):
    assert sum(p.numel() for p in build_model(name).parameters()) == params


@pytest.mark.parametrize("name,kw,shape", [
    ("linear", {"in_features": 12, "out_features": 2}, (4, 12)),
    ("mlp", {"in_features": 48, "num_classes": 5, "hidden": [8]}, (4, 3, 4, 4)),
    ("small_cnn", {"in_channels": 3, "num_classes": 7}, (4, 3, 16, 16)),
    ("resnet18", {"num_classes": 10, "small_input": True}, (2, 3, 32, 32)),
    ("mobilenet_v2", {"num_classes": 10}, (2, 3, 64, 64)),
])
def test_forward_shapes_and_channels_last(name, kw, shape):
    m = build_model(name, **kw).eval()
    x = torch.randn(*shape)
    out = m(x)
    assert out.shape[0] == shape[0] and out.ndim == 2
    if x.ndim == 4:
        m2 = m.to(memory_format=torch.channels_last)
        torch.testing.assert_close(m2(x.to(memory_format=torch.channels_last)), out, rtol=1e-4, atol=1e-4)


def test_unknown_model_or_argument():
    with pytest.raises(BadInput, match="unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(BadInput, match="takes no argument 'depth'"):
        build_model("resnet18", depth=3)
    with pytest.raises(BadInput, match="needs 'in_features'"):
        build_model("mlp")


GRADS = """
import sys, json, torch, mpidl
from mpidl.train.backends import make_backend
w = mpidl.init()


def main(name):  # models die with this frame, before the interpreter tears down Gloo's threads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    if w.rank != 0:  # different initial weights: prepare() must give everyone rank 0's
        for p in model.parameters():
            p.data.add_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backend = make_backend(name, w, {"bucket_mb": 0.0001})   # tiny buckets: several allreduces
    model, opt = backend.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(8 * w.size, 6, generator=g), torch.randn(8 * w.size, 2, generator=g)
    mine = slice(8 * w.rank, 8 * (w.rank + 1))
    torch.nn.functional.mse_loss(model(X[mine]), Y[mine]).backward()
    backend.sync_gradients(model, opt)
    got = [p.grad.clone() for p in backend.unwrap(model).parameters()]
    # the full-batch gradient, on one process, of the same (rank 0) weights
    ref = [p.detach().clone().requires_grad_() for p in backend.unwrap(model).parameters()]
    h = torch.tanh(X @ ref[0].T + ref[1])
    torch.nn.functional.mse_loss(h @ ref[2].T + ref[3], Y).backward()
    ok = all(torch.allclose(a, b.grad, rtol=1e-5, atol=1e-6) for a, b in zip(got, ref))
    params = [p.detach().clone() for p in backend.unwrap(model).parameters()]
    backend.step(opt)
    oks = w.comm.gather(ok, root=0)
    del model, opt  # a DDP model must go before its process group
    backend.close()
    return oks


got = {name: main(name) for name in json.loads(sys.argv[1])}  # each backend in turn, set up and closed
if w.rank == 0:
    print("RESULT " + json.dumps(got), flush=True)
"""


@pytest.fixture(scope="module")
def gradients() -> dict:
    """Rank count -> {backend: each rank's verdict}: the backends in turn in one launch a rank count."""
    done: dict = {}

    def of(np_: int) -> dict:
        if np_ not in done:
            r = mpirun(np_, pycode(GRADS) + [json.dumps(BACKENDS)], timeout=180)
            assert r.returncode == 0, r.output[-3000:]
            (done[np_],) = results(r)
        return done[np_]
    return of


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("backend", ["horovod", "ddp", "mpi"])
def test_backend_gradient_is_the_full_batch_gradient(gradients, backend, np_):
    if backend == "horovod" and not has_horovod():
        pytest.skip("Horovod is not installed")
    assert gradients(np_)[backend] == [True] * np_
