"""Sharded HDF5 data: the pure plan, real multi-rank loading, validation, statistics, tools."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import bad_input_lines, mpidl_cmd, mpirun, needs_cuda, pycode, results, run
from mpidl.data.shard import plan_epoch, steps_per_epoch
from mpidl.errors import BadInput


# ---------------------------------------------------------------- the pure plan
@pytest.mark.parametrize("shuffle", ["block", "exact", "none"])
@pytest.mark.parametrize("rows,ranks,batch", [(1000, 3, 7), (97, 3, 5), (4096 * 3 + 5, 2, 100), (64, 1, 64)])
def test_plan_disjoint_equal_covering(shuffle, rows, ranks, batch):
    plans = plan_epoch(rows, ranks, batch, seed=1, epoch=2, block=16, window=60, shuffle=shuffle)
    idx = [p.indices() for p in plans]
    steps = steps_per_epoch(rows, ranks, batch)
    assert all(len(i) == steps * batch for i in idx)
    allrows = np.concatenate(idx)
    assert len(np.unique(allrows)) == len(allrows)  # disjoint
    assert allrows.min() >= 0 and allrows.max() < rows
    assert rows - len(allrows) < ranks * batch  # drop-last leaves less than one global batch


@pytest.mark.parametrize("shuffle", ["block", "exact"])
def test_plan_pad_covers_everything(shuffle):
    plans = plan_epoch(1003, 3, 10, seed=0, epoch=0, block=32, window=100, drop_last=False, shuffle=shuffle)
    allrows = np.concatenate([p.indices() for p in plans])
    assert len(allrows) == 3 * 10 * 34
    assert set(allrows.tolist()) == set(range(1003))


def test_plan_deterministic_and_changes_per_epoch():
    a = [p.indices() for p in plan_epoch(5000, 2, 32, seed=7, epoch=3, block=64)]
    b = [p.indices() for p in plan_epoch(5000, 2, 32, seed=7, epoch=3, block=64)]
    c = [p.indices() for p in plan_epoch(5000, 2, 32, seed=7, epoch=4, block=64)]
    d = [p.indices() for p in plan_epoch(5000, 2, 32, seed=8, epoch=3, block=64)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    # the shard itself (the set of rows) changes, not only the order
    assert set(a[0].tolist()) != set(c[0].tolist())


def test_plan_reads_are_large():
    plan = plan_epoch(100_000, 2, 64, seed=0, epoch=0, block=4096, window=16384)[0]
    runs = [b - a for w in plan.windows for a, b in w.ranges]
    assert np.median(runs) >= 2048  # block-sized reads, not rows


def test_plan_rejects_too_few_rows():
    with pytest.raises(BadInput, match="fewer than ranks × batch"):
        plan_epoch(10, 3, 4, seed=0, epoch=0)


# ---------------------------------------------------------------- real files, real ranks
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    n = 1500
    with h5py.File(d / "float.h5", "w") as f:  # contiguous float32, row i holds i
        f["x"] = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
        f["y"] = np.arange(n, dtype=np.int64)
    sizes, start = [700, 500, 333], 0
    for i, m in enumerate(sizes):  # uint8 images over three files of different lengths
        with h5py.File(d / f"img-{i}.h5", "w") as f:
            ids = np.arange(start, start + m)
            f.create_dataset("images", data=np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None, None],
                                                            (m, 1, 4, 4)).copy(), chunks=(64, 1, 4, 4))
            f["labels"] = ids.astype(np.int64)
            start += m
    start = 0
    for i, m in enumerate([900, 611]):  # rows of 4.4 KB: read straight into batches, across two files
        with h5py.File(d / f"wide-{i}.h5", "w") as f:
            ids = np.arange(start, start + m)
            f["x"] = np.repeat(ids.astype(np.float32)[:, None], 1100, axis=1)
            f["y"] = ids
            start += m
    with h5py.File(d / "gzip.h5", "w") as f:
        f.create_dataset("x", data=np.arange(n * 3, dtype=np.float64).reshape(n, 3), chunks=(100, 3),
                         compression="gzip")
        f.create_dataset("y", data=np.arange(n, dtype=np.int32), chunks=(100,), compression="gzip")
    with h5py.File(d / "lzf.h5", "w") as f:
        f.create_dataset("x", data=np.arange(n * 3, dtype=np.float64).reshape(n, 3), chunks=(128, 3),
                         compression="lzf")
        f.create_dataset("y", data=np.arange(n, dtype=np.int32), chunks=(128,), compression="lzf")
    return d


LOAD = """
import json, sys, numpy as np, mpidl
from mpidl.data import H5Source, ShardedLoader
w = mpidl.init()
for cfg in json.loads(sys.argv[1]):  # several loaders, one after another, in one launch
    src = H5Source(cfg["files"], keys=cfg["keys"])
    ld = ShardedLoader(src, w, batch_size=cfg["batch"], seed=cfg["seed"], shuffle=cfg["shuffle"],
                       drop_last=cfg["drop_last"], prefetch=2, block=cfg.get("block"), window=cfg.get("window"),
                       stage_dir=cfg.get("stage_dir"))
    epochs = []
    for e in range(cfg["epochs"]):
        ld.set_epoch(e)
        ys = []
        for x, y in ld:
            assert x.shape[0] == cfg["batch"] and y.shape[0] == cfg["batch"]
            xv = x.reshape(x.shape[0], -1)[:, 0].double().numpy()
            yv = y.reshape(-1).numpy().astype(np.int64)
            assert np.array_equal(xv, cfg["x_of_y"][0] * (yv % cfg["x_of_y"][1] if cfg["x_of_y"][1] else yv)), \
                "x/y misaligned"
            ys.extend(yv.tolist())
        epochs.append(ys)
    staged = ld.staged_path
    out = w.comm.gather({"steps": len(ld), "dtype": str(x.dtype), "epochs": epochs,
                         "staged": staged and [str(staged), staged.exists()]}, root=0)
    if w.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
"""


def config(files, keys, *, batch=16, seed=0, shuffle="block", drop_last=True, epochs=2, x_of_y=(1, 0), **kw):
    return dict(files=files, keys=keys, batch=batch, seed=seed, shuffle=shuffle, drop_last=drop_last,
                epochs=epochs, x_of_y=x_of_y, **kw)


def each_in_one_launch(np_: int, script: str, cfgs, timeout: float = 120) -> list:
    """Each config's result, `script` handling them in turn on the same `np_` ranks of one launch."""
    r = mpirun(np_, pycode(script) + [json.dumps(list(cfgs))], timeout=timeout)
    assert r.returncode == 0, r.output[-3000:]
    found = results(r)
    assert len(found) == len(cfgs), r.output[-3000:]
    return found


def each_by_ranks(script: str, cfgs: dict, timeout: float = 120) -> dict:
    """Each config's result, keyed as `cfgs` is by (rank count, name): the configs of a rank count
    handled in turn by one launch of that many ranks."""
    out = {}
    for np_ in sorted({ranks for ranks, _ in cfgs}):
        keys = [key for key in cfgs if key[0] == np_]
        out.update(zip(keys, each_in_one_launch(np_, script, [cfgs[key] for key in keys], timeout)))
    return out


def load_all(np_, *cfgs: dict) -> list:
    """Each config's result, its loader made and read in turn by the same `np_` ranks of one launch."""
    return each_in_one_launch(np_, LOAD, cfgs)


def load(np_, files, keys, **kw):
    return load_all(np_, config(files, keys, **kw))[0]


def check_epochs(result, rows, np_, batch):
    per_rank = steps_per_epoch(rows, np_, batch) * batch
    for e in range(len(result[0]["epochs"])):
        shards = [r["epochs"][e] for r in result]
        assert all(len(s) == per_rank for s in shards)  # equal
        flat = [y for s in shards for y in s]
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) <= set(range(rows)) and rows - len(flat) < np_ * batch  # cover modulo drop-last
    if len(result[0]["epochs"]) > 1:
        assert result[0]["epochs"][0] != result[0]["epochs"][1]  # reshuffled
        assert set(result[0]["epochs"][0]) != set(result[0]["epochs"][1])  # and re-sharded


def _load_cases(files: Path, stage: Path) -> dict[tuple[int, str], dict]:
    """(ranks, name): the loader config of a case on the module's files."""
    floats = config([str(files / "float.h5")], ["x", "y"], batch=16, block=32, window=128)
    cases = {}
    for np_ in (2, 3):
        cases[np_, "float"] = floats
        cases[np_, "float-seed-1"] = {**floats, "seed": 1, "epochs": 1}
        cases[np_, "uint8-glob"] = config(str(files / "img-*.h5"), ["images", "labels"], batch=10, x_of_y=(1, 251))
        for shuffle in ("block", "exact"):
            cases[np_, f"wide-{shuffle}"] = config(str(files / "wide-*.h5"), ["x", "y"], batch=32, shuffle=shuffle)
    for name in ("gzip.h5", "lzf.h5"):
        cases[3, name] = config([str(files / name)], ["x", "y"], batch=20, shuffle="exact", x_of_y=(3, 0))
    cases[3, "pad"] = config([str(files / "float.h5")], ["x", "y"], batch=16, drop_last=False, epochs=1)
    cases[2, "staged"] = config([str(files / "float.h5")], ["x", "y"], batch=16, stage_dir=str(stage))
    return cases


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """The staged case's stage_dir."""
    return tmp_path_factory.mktemp("stage")


@pytest.fixture(scope="module")
def loaded(files, stage):
    """Each case's result: the cases of a rank count are loaded in turn by one launch of that many ranks."""
    return each_by_ranks(LOAD, _load_cases(files, stage))


@pytest.mark.parametrize("np_", [2, 3])
def test_float_file_shards(files, loaded, np_):
    res, other = loaded[np_, "float"], loaded[np_, "float-seed-1"]  # the other seed in the same launch
    check_epochs(res, 1500, np_, 16)
    assert res[0]["dtype"] == "torch.float32"
    again = load(np_, [str(files / "float.h5")], ["x", "y"], batch=16, block=32, window=128)  # a fresh launch
    assert again == res  # reproducible for a seed
    assert other[0]["epochs"][0] != res[0]["epochs"][0]


@pytest.mark.parametrize("np_", [2, 3])
def test_multi_file_uint8_glob(loaded, np_):
    res = loaded[np_, "uint8-glob"]
    check_epochs(res, 1533, np_, 10)
    assert res[0]["dtype"] == "torch.uint8"


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("shuffle", ["block", "exact"])
def test_large_rows_read_directly(loaded, np_, shuffle):
    check_epochs(loaded[np_, f"wide-{shuffle}"], 1511, np_, 32)


def test_large_row_loader_groups_runs(files):
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    ld = ShardedLoader(H5Source(str(files / "wide-*.h5")), mpidl.init(), batch_size=64)
    assert ld.group > 1  # 4.4 KB rows move in runs of several rows
    idx = ld.plan().indices()
    assert (np.diff(idx) == 1).mean() > 0.5


@needs_cuda
@pytest.mark.parametrize("name", ["wide-*.h5", "float.h5"])  # direct pread path, windowed path
def test_cuda_batches_equal_cpu_batches(files, name):
    """The pinned ring and its copy events: batches kept on the device, unsynchronised, stay intact."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    world = mpidl.init()
    src = H5Source(str(files / name))
    loaders = {dev: ShardedLoader(src, world, batch_size=32, seed=1, prefetch=2, device=dev)
               for dev in ("cpu", "cuda")}
    for ld in loaders.values():
        ld.set_epoch(1)
    on_gpu = list(loaders["cuda"])  # every batch held while the ring is reused behind them
    on_cpu = [tuple(t.clone() for t in b) for b in loaders["cpu"]]
    assert len(on_gpu) == len(on_cpu) == len(loaders["cpu"])
    for g, c in zip(on_gpu, on_cpu):
        assert all(t.is_cuda for t in g)
        for tg, tc in zip(g, c):
            assert torch.equal(tg.cpu(), tc)


@needs_cuda
def test_cuda_loader_with_augmentation_never_synchronises(files):
    """A training pass (crop, flip, scaling on the device) and an evaluation pass (masks) under
    CUDA's sync debug mode "error": any call that stalls the host on the device raises."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader
    from mpidl.data.preprocess import Pipeline

    world = mpidl.init()
    src = H5Source(str(files / "img-*.h5"), keys=["images", "labels"])
    train = ShardedLoader(src, world, batch_size=32, device="cuda", prefetch=2,
                          transform=Pipeline(scale_uint8=True, crop=4, padding=1, flip=True, seed=1))
    evaluate = ShardedLoader(src, world, batch_size=32, device="cuda", evaluation=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = sum(x.shape[0] for x, _ in train)
        seen = sum(mask.sum() for _, _, mask in evaluate)  # summed on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == len(train) * 32 and int(seen) == len(src)


@pytest.mark.parametrize("name", ["gzip.h5", "lzf.h5"])
def test_compressed_sources(loaded, name):
    check_epochs(loaded[3, name], 1500, 3, 20)


def test_pad_mode_covers_all_rows(loaded):
    res = loaded[3, "pad"]
    flat = [y for r in res for y in r["epochs"][0]]
    assert len(flat) == 3 * 16 * 32 and set(flat) == set(range(1500))


EVAL = """
import json, sys, h5py, numpy as np, torch, mpidl
from mpidl.data import H5Source, ShardedLoader
w = mpidl.init()
for path, rows, batch, chunks in json.loads(sys.argv[1]):  # one file after another, in one launch
    if w.rank == 0:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.arange(rows * 5, dtype=np.float32).reshape(rows, 5), chunks=chunks and tuple(chunks),
                             compression="gzip" if chunks else None)
            f["y"] = np.arange(rows)
    w.barrier()
    ld = ShardedLoader(H5Source(path), w, batch_size=batch, evaluation=True, prefetch=2)
    seen, sizes = [], []
    for i, (x, y, mask) in enumerate(ld):
        assert mask.dtype == torch.bool and x.shape[0] == y.shape[0] == mask.shape[0] == batch
        real = min(batch, max(0, ld.samples - i * batch))  # real rows first: countable on the host
        assert torch.equal(mask, torch.arange(batch) < real)
        assert torch.equal(x[:, 0], y.float() * 5)
        seen.extend(y[mask].tolist())
        total = w.comm.allreduce(int(mask.sum()))  # a collective per batch: ranks stay in step
        sizes.append(total)
    out = w.comm.gather({"seen": seen, "steps": len(ld), "batches": len(sizes), "samples": ld.samples,
                         "sizes": sizes}, root=0)
    if w.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
"""


EVAL_CASES = [(360, 2, 32, None), (360, 3, 32, None), (361, 3, 32, [50, 5]), (2, 3, 4, None), (100, 3, 7, [16, 5])]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Each EVAL_CASES case's result: the cases of a rank count in turn, in one launch of that many."""
    tmp = tmp_path_factory.mktemp("eval")
    return each_by_ranks(EVAL, {(np_, i): [str(tmp / f"val-{i}.h5"), rows, batch, chunks]
                                for i, (rows, np_, batch, chunks) in enumerate(EVAL_CASES)}, timeout=180)


@pytest.mark.parametrize("rows,np_,batch,chunks", EVAL_CASES)
def test_evaluation_sees_every_row_once(evaluated, rows, np_, batch, chunks):
    res = evaluated[np_, EVAL_CASES.index((rows, np_, batch, chunks))]
    seen = [y for rank in res for y in rank["seen"]]
    assert sorted(seen) == list(range(rows))  # every held-out row exactly once across ranks
    assert sum(rank["samples"] for rank in res) == rows
    steps = -(-(-(-rows // np_)) // batch)  # noqa: B002 -- two ceiling divisions, not a decrement
    assert all(rank["steps"] == rank["batches"] == steps for rank in res)  # the same count on every rank
    assert sum(res[0]["sizes"]) == rows


def test_staging_reads_a_fixed_share(loaded, stage):
    res = loaded[2, "staged"]
    for r in res:
        assert set(r["epochs"][0]) == set(r["epochs"][1]) and r["epochs"][0] != r["epochs"][1]
    assert not set(res[0]["epochs"][0]) & set(res[1]["epochs"][0])
    # one file a rank in the user's private folder while it ran; gone when the ranks ended
    mine = stage / f"mpidl-{os.getuid()}"
    assert sorted(r["staged"][0].rsplit("-r", 1)[1].split("-")[0] for r in res) == ["0of2", "1of2"]
    assert all(r["staged"][1] and r["staged"][0].startswith(f"{mine}/mpidl-stage-") for r in res)
    assert (mine.stat().st_mode & 0o777) == 0o700 and list(mine.iterdir()) == []


def test_resume_mid_epoch_yields_the_rest():
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    world = mpidl.init()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mpidl-resume-{os.getpid()}.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(800, dtype=np.float32)[:, None]
        f["y"] = np.arange(800)
    try:
        ld = ShardedLoader(H5Source(path), world, batch_size=8, seed=5, block=16, window=64)
        ld.set_epoch(1)
        full = torch.cat([y.clone() for _, y in ld])  # a CPU batch lives until the next is asked for
        ld.set_epoch(1, start_step=13)
        rest = torch.cat([y.clone() for _, y in ld])
        assert torch.equal(rest, full[13 * 8:])
        ld.set_epoch(1)
        for i, _ in enumerate(ld):  # breaking out early stops the reader threads cleanly
            if i == 2:
                break
        assert torch.equal(torch.cat([y.clone() for _, y in ld]), full)
    finally:
        os.remove(path)


# ---------------------------------------------------------------- every read path against h5py
# Each layout stores x = random values and y = the global row id, so a batch can be checked
# against h5py's own read of the same rows, and how mpidl must read x. Chunks (n,) span whole rows.
LAYOUTS = {
    "contiguous": ([dict()], "bytes"),  # rows of 768 B: pread (large rows are mapped)
    "row chunks": ([dict(chunks=(64,))], "bytes"),
    "auto chunks": ([dict(chunks=True)], "chunks"),
    "split rows": ([dict(chunks=(50, 2, 8, 3))], "chunks"),
    "column chunks": ([dict(chunks=(70, 3, 8, 2))], "chunks"),  # only the last axis cut: read as stored
    "lzf column chunks": ([dict(chunks=(60, 3, 8, 4), compression="lzf")], "chunks"),
    "gzip": ([dict(chunks=(64,), compression="gzip")], "chunks"),
    "gzip shuffle": ([dict(chunks=(40, 3, 4, 8), compression="gzip", shuffle=True)], "chunks"),
    "lzf": ([dict(chunks=(64,), compression="lzf")], "chunks"),
    "lzf split": ([dict(chunks=(30, 3, 8, 4), compression="lzf", shuffle=True)], "chunks"),
    "fletcher32": ([dict(chunks=(64,), fletcher32=True)], "h5py"),
    "mixed files": ([dict(compression="gzip", chunks=(64,)), dict(), dict(chunks=True, compression="lzf")],
                    None),
}
ROW_SHAPE = (3, 8, 8)  # 768 B of float32: the windowed path; WIDE rows (6 KiB) take the direct path


WIDE_COLUMN_CHUNKS = [dict(chunks=(70, 3, 16, 4))]  # only the last axis of 6 KiB rows cut


def write_layout(folder, name, sizes=(1000,), row_shape=ROW_SHAPE, noise=True, kws=None):
    """Files of one layout (LAYOUTS[name], or `kws`); random values (with some incompressible
    chunks) and y = row id."""
    kws = kws or LAYOUTS[name][0]
    rng = np.random.default_rng(len(name))
    paths, start = [], 0
    for n, (m, kw) in enumerate(zip(sizes, kws * len(sizes))):
        x = rng.integers(0, 4, (m, *row_shape)).astype(np.float32)
        if noise:  # incompressible rows: LZF stores such chunks raw (the filter mask says so)
            x[: m // 3] = rng.random((m // 3, *row_shape), dtype=np.float32)
        kw = dict(kw)
        if isinstance(kw.get("chunks"), tuple):  # (rows,): whole rows; else an explicit split of ROW_SHAPE
            kw["chunks"] = (min(kw["chunks"][0], m), *(kw["chunks"][1:] or row_shape))
        path = folder / f"{name.replace(' ', '-')}-{n}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, **kw)
            f.create_dataset("y", data=np.arange(start, start + m), **{k: v for k, v in kw.items() if k != "chunks"},
                             **({"chunks": True} if "chunks" in kw or kw else {}))
        paths.append(str(path))
        start += m
    return paths


def reference(paths, rows):
    """h5py's own read of global rows `rows` (any order)."""
    xs = []
    for p in paths:
        with h5py.File(p, "r", locking=False) as f:
            xs.append(f["x"][:])
    full = np.concatenate(xs)
    return full[np.asarray(rows)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reader_paths_match_h5py(tmp_path, name):
    """Ranges (with and without a scatter order) and single rows read as h5py reads them."""
    from mpidl.data import H5Source

    sizes = (400, 333, 267) if name == "mixed files" else (1000,)
    paths = write_layout(tmp_path, name, sizes)
    src = H5Source(paths)
    n = len(src)
    rng = np.random.default_rng(1)
    with src.open(workers=3) as reader:
        want = LAYOUTS[name][1]
        got_paths = reader.paths("x")
        assert got_paths == ([want] * len(paths) if want else ["chunks", "bytes", "chunks"]), got_paths
        out = np.empty((n, *ROW_SHAPE), np.float32)
        reader.read("x", 0, n, out)
        np.testing.assert_array_equal(out, reference(paths, np.arange(n)))
        for _ in range(5):  # scattered ranges across chunk and file boundaries, in any order
            cuts = rng.choice(np.arange(1, n), 12, replace=False)
            ranges = [(int(min(a, b)), int(max(a, b))) for a, b in zip(cuts[0::2], cuts[1::2])]
            ranges += [(int(a), int(a) + 1) for a in rng.integers(0, n, 40)]  # single rows, some repeated
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            out = np.zeros((rows.size, *ROW_SHAPE), np.float32)
            y = np.zeros(rows.size, np.int64)
            reader.start({"x": out, "y": y}, ranges).wait()
            np.testing.assert_array_equal(y, rows)
            np.testing.assert_array_equal(out, reference(paths, rows))
        if all(p == "bytes" for p in got_paths):
            pick = rng.permutation(n)[:100]
            out = np.empty((100, *ROW_SHAPE), np.float32)
            reader.read_rows("x", pick, out)
            np.testing.assert_array_equal(out, reference(paths, pick))


def test_row_range_of_compressed_source(tmp_path):
    from mpidl.data import H5Source

    paths = write_layout(tmp_path, "gzip")
    src = H5Source(paths, rows=(123, 877))
    with src.open(workers=2) as reader:
        out = np.empty((754, *ROW_SHAPE), np.float32)
        reader.read("x", 0, 754, out)
    np.testing.assert_array_equal(out, reference(paths, np.arange(123, 877)))


CHECK = """
import json, os, sys, h5py, numpy as np, mpidl
from mpidl.data import H5Source, ShardedLoader
w = mpidl.init()
for cfg in json.loads(sys.argv[1]):  # several loaders, one after another, in one launch
    full = np.concatenate([h5py.File(p, "r")["x"][:] for p in cfg["files"]])
    os.environ["MPIDL_MAPPED"] = "1" if cfg.get("mapped", True) else "0"
    ld = ShardedLoader(H5Source(cfg["files"]), w, batch_size=cfg["batch"], seed=3, shuffle=cfg["shuffle"],
                       prefetch=2, workers=cfg["workers"], block=cfg.get("block"), window=cfg.get("window"))
    with ld.source.open() as reader:
        mapped = reader.mapped("x")
    epochs = []
    for e in range(2):
        ld.set_epoch(e)
        ys = []
        for x, y in ld:
            assert np.array_equal(x.numpy(), full[y.numpy()]), (cfg["files"], "batch differs from h5py's read")
            ys.extend(y.tolist())
        epochs.append(ys)
    out = w.comm.gather({"epochs": epochs, "grouped": ld.group > 1, "mapped": mapped}, root=0)
    if w.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
"""


LOADER_CASES = {  # rank count: (layout name, shuffle), each read in turn by one launch of that many ranks
    2: [("row chunks", "block"), ("gzip shuffle", "block"), ("mixed files", "block"), ("contiguous", "block"),
        ("lzf split", "block"), ("column chunks", "block"), ("contiguous pread", "block"),
        ("wide column chunks", "block")],
    3: [("auto chunks", "block"), ("lzf", "exact"), ("mixed files", "exact"), ("lzf column chunks", "exact")],
}


@pytest.mark.parametrize("np_", sorted(LOADER_CASES))
def test_loader_batches_equal_h5py_reads(tmp_path, np_):
    """Every batch on every rank holds exactly h5py's values of its rows; shards stay disjoint."""
    cases, cfgs = [], []
    for i, (name, shuffle) in enumerate(LOADER_CASES[np_]):
        sizes = (700, 611, 456) if name == "mixed files" else (1767,)
        layout = name.removesuffix(" pread")  # contiguous rows read with pread, not from a mapping
        # 6 KiB rows: moved in runs, read straight into batch slots or gathered from column chunks
        wide = layout in ("row chunks", "contiguous", "wide column chunks")
        folder = tmp_path / str(i)
        folder.mkdir()
        paths = write_layout(folder, layout, sizes, row_shape=(3, 16, 32) if wide else ROW_SHAPE,
                             kws=WIDE_COLUMN_CHUNKS if layout == "wide column chunks" else None)
        cases.append((name, sizes, wide))
        cfgs.append(dict(files=paths, batch=32, shuffle=shuffle, workers=2, block=None if wide else 64, window=256,
                         mapped=layout == name))
    for (name, sizes, wide), res in zip(cases, each_in_one_launch(np_, CHECK, cfgs, timeout=240)):
        assert all(rank["grouped"] == wide for rank in res), name
        assert all(rank["mapped"] == (name == "contiguous") for rank in res), name
        check_epochs(res, sum(sizes), np_, 32)


LARGE_BATCHES = [("contiguous", (3, 16, 32), 192, 2), ("column chunks", ROW_SHAPE, 1400, 2),
                 ("contiguous", (3, 16, 32), 192, 3), ("column chunks", ROW_SHAPE, 1400, 3)]


@pytest.fixture(scope="module")
def large_batches(tmp_path_factory):
    """Each LARGE_BATCHES case's result and its first file, read in turn by one launch of 2 ranks."""
    tmp = tmp_path_factory.mktemp("large")
    paths = {}
    for name, row_shape, _, _ in LARGE_BATCHES:
        if name not in paths:  # each layout's files once, read by both of its cases
            (tmp / name.replace(" ", "-")).mkdir()
            paths[name] = write_layout(tmp / name.replace(" ", "-"), name, (4000, 3111), row_shape=row_shape)
    cfgs = [dict(files=paths[name], batch=batch, shuffle="block", workers=workers)
            for name, _, batch, workers in LARGE_BATCHES]
    return {case: (res, paths[case[0]][0])
            for case, res in zip(LARGE_BATCHES, each_in_one_launch(2, CHECK, cfgs, timeout=300))}


@pytest.mark.parametrize("name,row_shape,batch,workers", LARGE_BATCHES)
def test_large_batches_cut_by_assembler_threads(large_batches, name, row_shape, batch, workers):
    """Batches of a MiB or more with two workers are cut half by the reader thread, half by an
    assembler; with more workers each batch by one of them (the path of machines with many
    cores, here on two). Direct reads, and column chunks read in runs that span chunks: each
    batch still holds exactly h5py's values of its rows, across two files."""
    res, first = large_batches[name, row_shape, batch, workers]
    with h5py.File(first) as f:
        assert workers > 2 or batch * f["x"][0].nbytes >= 1 << 20  # the shared path
    assert all(rank["mapped"] == (name == "contiguous") for rank in res)  # rows of two files, one take each
    check_epochs(res, 7111, 2, batch)


def mapped_kib(path: str) -> int:
    """This process's resident KiB of its mappings of `path` (from /proc/self/smaps)."""
    total, mine, target = 0, False, os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and not head[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                mine = len(head) >= 6 and head[5] == target
            elif mine and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_mapped_pages_are_dropped_window_by_window(tmp_path, monkeypatch):
    """Contiguous rows are copied from a mapping of the file; the pages a window touched are
    unmapped at the next, so the process holds about a window of them, not the file."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader
    from mpidl.data.source import Reader

    rows, row = 12000, 6144
    paths = write_layout(tmp_path, "contiguous", (rows,), row_shape=(3, 16, 32), noise=False)  # 72 MiB of x
    ld = ShardedLoader(H5Source(paths), mpidl.init(), batch_size=32, block=512, window=1024, workers=1)
    # At most the window being cut and the next, plus what the kernel maps around each block's
    # ends (it maps a file's pages in folios of up to 2 MiB, not only the pages touched).
    bound = 2 * (1024 * row + 2 * 2 * (2 << 20))

    def most_resident() -> int:
        most = 0
        for i, _ in enumerate(ld):
            if i % 4 == 0:
                most = max(most, mapped_kib(paths[0]) << 10)
        return most

    bounded = most_resident()
    monkeypatch.setattr(Reader, "unmap_pages", lambda self: None)
    kept = most_resident()
    assert 0 < bounded <= bound, (bounded, bound)
    assert kept > 0.7 * rows * row > bound, kept  # the measure sees pages left mapped


def test_mapped_rows_on_resume_and_in_evaluation(tmp_path):
    """The mapped path across two files: a pass resumed at a step yields the rest of the full
    pass, and evaluation (with padding) sees every row once, each batch h5py's values."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    wide = (3, 16, 32)
    paths = write_layout(tmp_path, "contiguous", (301, 250), row_shape=wide)
    full = reference(paths, np.arange(551))
    world, src = mpidl.init(), H5Source(paths)
    with src.open() as reader:
        assert reader.mapped("x") and reader.paths("x") == ["mapped"] * 2 and reader.paths("y") == ["bytes"] * 2
        pick = np.random.default_rng(0).permutation(551)[:100]  # rows of both files, any order
        out = np.zeros((100, *wide), np.float32)
        segments = reader.row_segments("x", pick, 100)[0]
        reader.take_rows("x", segments, out.reshape(100, -1).view(np.uint8), 0, 37)  # in two parts
        reader.take_rows("x", segments, out.reshape(100, -1).view(np.uint8), 37, 100)
        np.testing.assert_array_equal(out, full[pick])
        with pytest.raises(ValueError, match="'y' is not read from a mapping"):
            reader.take_rows("y", segments, out.reshape(100, -1).view(np.uint8))
    ld = ShardedLoader(src, world, batch_size=32, seed=2, workers=2)
    ld.set_epoch(1)
    whole = [(x.clone(), y.clone()) for x, y in ld]
    ld.set_epoch(1, start_step=5)
    rest = [(x.clone(), y.clone()) for x, y in ld]
    assert len(rest) == len(whole) - 5 > 0
    for (xa, ya), (xb, yb) in zip(whole[5:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for x, y in whole:
        np.testing.assert_array_equal(x.numpy(), full[y.numpy()])
    seen = []
    for x, y, mask in ShardedLoader(src, world, batch_size=32, evaluation=True, workers=2):
        np.testing.assert_array_equal(x.numpy(), full[y.numpy()])
        seen.extend(y[mask].tolist())
    assert sorted(seen) == list(range(551))


def test_only_column_chunks_group_large_rows(tmp_path):
    """Large rows move in runs where chunks cut only their last axis (a run's pieces of a chunk
    lie side by side), not where chunks cut them otherwise (rows are decoded whole into the window)."""
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    wide = (3, 16, 32)
    columns = write_layout(tmp_path, "column chunks", (500,), row_shape=wide, kws=WIDE_COLUMN_CHUNKS)
    (tmp_path / "split").mkdir()
    split = write_layout(tmp_path / "split", "split rows", (500,), row_shape=wide, kws=[dict(chunks=(50, 2, 8, 4))])
    world = mpidl.init()
    assert H5Source(columns).column_chunked("x") and not H5Source(split).column_chunked("x")
    assert ShardedLoader(H5Source(columns), world, batch_size=64).group > 1
    assert ShardedLoader(H5Source(split), world, batch_size=64).group == 1


def test_files_that_cannot_be_mapped_are_read_with_pread(tmp_path, monkeypatch):
    """A file cut short under an open reader is not mapped (reading the mapping past its end
    would end the process with SIGBUS): pread reads it and names it, in one line, at the first
    short read. A file system that cannot map files is read with pread too."""
    from mpidl.data import H5Source
    from mpidl.data import source

    paths = write_layout(tmp_path, "contiguous", (600,), row_shape=(3, 16, 32))
    with H5Source(paths).open() as reader:
        assert reader.mapped("x")  # as written
    with H5Source(paths).open() as reader:
        os.truncate(paths[0], os.path.getsize(paths[0]) // 2)
        assert not reader.mapped("x") and reader.paths("x") == ["bytes"]
        reader.read_rows("x", np.arange(10), np.empty((10, 3, 16, 32), np.float32))  # the first half is there
        with pytest.raises(OSError, match=r"contiguous-0.h5: short read of 'x' at byte \d+ .*the file is truncated"):
            reader.read_rows("x", np.arange(590, 600), np.empty((10, 3, 16, 32), np.float32))

    def no_mapping(*args, **kwargs):
        raise OSError(19, "No such device")

    (tmp_path / "fs").mkdir()
    paths = write_layout(tmp_path / "fs", "contiguous", (600,), row_shape=(3, 16, 32))
    monkeypatch.setattr(source.mmap, "mmap", no_mapping)
    with H5Source(paths).open() as reader:
        assert not reader.mapped("x")
        out = np.empty((10, 3, 16, 32), np.float32)
        reader.read_rows("x", np.arange(5, 15), out)
        np.testing.assert_array_equal(out, reference(paths, np.arange(5, 15)))


# ---------------------------------------------------------------- validation, on every rank
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    f32, i64 = np.float32, np.int64
    layouts = {  # file -> its datasets, each broken in one way
        "good.h5": {"x": np.zeros((100, 3), f32), "y": np.zeros(100, i64)},
        "nokey.h5": {"inputs": np.zeros((100, 3), f32), "y": np.zeros(100, i64)},
        "lengths.h5": {"x": np.zeros((100, 3), f32), "y": np.zeros(99, i64)},
        "shape.h5": {"x": np.zeros((100, 4), f32), "y": np.zeros(100, i64)},
        "empty.h5": {"x": np.zeros((0, 3), f32), "y": np.zeros(0, i64)},
        "strings.h5": {"x": np.array([b"a"] * 100), "y": np.zeros(100, i64)},
    }
    for name, datasets in layouts.items():
        with h5py.File(d / name, "w") as f:
            for key, value in datasets.items():
                f[key] = value
    (d / "garbage.h5").write_bytes(b"this is not an HDF5 file\n" * 100)
    with h5py.File(d / "big.h5", "w") as f:
        f["x"] = np.random.default_rng(0).random((20000, 16), dtype=np.float32)
        f["y"] = np.zeros(20000, np.int64)
    raw = (d / "big.h5").read_bytes()
    (d / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (d / "big.h5").unlink()
    return d


BAD_SOURCES = [  # (case, `mpidl data check` arguments, parts of its one line)
    ("missing file", ["missing.h5"], ["missing.h5", "file not found"]),
    ("unreadable", ["garbage.h5"], ["garbage.h5", "cannot open as HDF5"]),
    ("truncated", ["truncated.h5"], ["truncated.h5", "truncated"]),
    ("missing dataset", ["nokey.h5"], ["nokey.h5", "dataset 'x' not found", "inputs"]),
    ("different lengths", ["lengths.h5"], ["lengths.h5", "'x' has 100 rows", "'y' has 99"]),
    ("trailing shapes", ["good.h5", "shape.h5"], ["shape.h5", "(4,)", "(3,)", "good.h5"]),
    ("zero rows", ["empty.h5"], ["empty.h5", "zero rows"]),
    ("non-numeric", ["strings.h5"], ["strings.h5", "'x'", "non-numeric dtype"]),
    ("too few rows", ["good.h5", "--batch", "40"], ["100 rows are fewer than ranks × batch"]),
]

def test_bad_sources_are_one_line_agreed_by_every_rank(bad):
    """3 ranks: the rank that finds the problem and the ones that only learn of it, more than one of those."""
    lines = bad_input_lines(3, [["data", "check", *args] for _, args, _ in BAD_SOURCES], cwd=bad)
    for (case, _, expect), line in zip(BAD_SOURCES, lines):
        for part in expect:
            assert part in line, (case, part, line)


def test_a_bad_source_exits_2_on_every_rank_with_one_line(bad):
    r = mpirun(3, mpidl_cmd("data", "check", "nokey.h5"), cwd=bad, timeout=60)
    assert r.returncode == 2, r.output
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr  # one line, printed once, no traceback
    assert "Traceback" not in r.stderr
    for part in ["nokey.h5", "dataset 'x' not found", "inputs"]:
        assert part in lines[0], (part, lines[0])


def test_check_accepts_good_source(bad):
    r = mpirun(2, mpidl_cmd("data", "check", "good.h5", "--batch", "10"), cwd=bad)
    assert r.returncode == 0, r.output
    assert "ok: 1 file(s), 100 rows" in r.stdout and "5 steps per epoch" in r.stdout


# ---------------------------------------------------------------- value scans: labels, non-finite values
SCAN = """
import json, sys, mpidl
from mpidl.data import H5Source
from mpidl.data.scan import check_labels, label_range, nonfinite
from mpidl.errors import BadInput
w = mpidl.init()
src = H5Source(sys.argv[1:])
out = {"range": label_range(src, w, "y"), "nonfinite": str(nonfinite(src, w, "x"))}
try:
    check_labels(src, w, "y", 10)
    out["check"] = None
except BadInput as e:
    out["check"] = str(e)
out["ok13"] = check_labels(src, w, "y", 13)
res = w.comm.gather(out, root=0)
if w.rank == 0:
    print("RESULT " + json.dumps(res), flush=True)
"""


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three files, labels 0..9 except 11 at row 40 and 12 at row 90 of the second; x finite
    except one NaN in the third file's row 7 and an infinity in its row 8."""
    d = tmp_path_factory.mktemp("labels")
    paths = []
    for i, n in enumerate([100, 120, 37]):
        y = np.arange(n) % 10
        x = np.ones((n, 2, 3), np.float32)
        if i == 1:
            y[40], y[90] = 11, 12
        if i == 2:
            x[7, 1, 2], x[8, 0, 0] = np.nan, np.inf
        with h5py.File(d / f"part-{i}.h5", "w") as f:
            f.create_dataset("x", data=x, chunks=(16, 2, 3), compression="gzip")
            f["y"] = y
        paths.append(str(d / f"part-{i}.h5"))
    return paths


@pytest.mark.parametrize("np_", [1, 3])
def test_label_range_and_first_offender_collectively(labelled, np_):
    r = mpirun(np_, pycode(SCAN) + labelled, timeout=120)
    assert r.returncode == 0, r.output
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert all(rank == res[0] for rank in res)  # every rank holds the same answer
    assert res[0]["range"] == [0, 12] and res[0]["ok13"] == [0, 12]
    msg = res[0]["check"]
    assert msg.startswith(f"{labelled[1]}: dataset 'y' row 40 holds label 11, outside [0, 10) for 10 classes"), msg
    assert "2 such labels" in msg
    assert res[0]["nonfinite"] == f"(2, Where(path='{labelled[2]}', key='x', row=7))"


def test_data_check_reports_values(labelled, bad):
    r = mpirun(2, mpidl_cmd("data", "check", *labelled, "--batch", "8"), timeout=120)
    assert r.returncode == 2, r.output
    assert "x: 2 non-finite values, the first in row 7 of " + labelled[2] in r.stdout
    assert "y: integer labels 0..12" in r.stdout
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{labelled[2]}: dataset 'x' row 7 holds non-finite values" in errors[0], r.stderr
    r = mpirun(3, mpidl_cmd("data", "check", *labelled, "--keys", "y", "--classes", "10"), timeout=120)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and len(errors) == 1, r.output
    assert f"{labelled[1]}: dataset 'y' row 40 holds label 11, outside [0, 10) for 10 classes" in errors[0]
    r = mpirun(2, mpidl_cmd("data", "check", "good.h5", "--classes", "3"), cwd=bad, timeout=120)
    assert r.returncode == 0, r.output
    assert "x: no non-finite values" in r.stdout and "y: integer labels 0..0" in r.stdout


# ---------------------------------------------------------------- statistics
STATS = """
import sys, json, mpidl
from mpidl.data import H5Source
from mpidl.data.preprocess import Standardizer
w = mpidl.init()
for path, per, cache in json.loads(sys.argv[1]):  # one fit after another, in one launch
    s = Standardizer.fit(H5Source(path), w, per=per, cache_dir=cache)
    if w.rank == 0:
        print("RESULT " + json.dumps({"mean": s.mean.tolist(), "std": s.std.tolist()}), flush=True)
"""


def test_standardization_matches_numpy(tmp_path):
    """Per feature and per channel, on 3 ranks; then again on 2, from the cache the first wrote."""
    rng = np.random.default_rng(3)
    x = (rng.normal(5, 3, (1001, 3, 4, 4)) * np.array([1, 10, 100])[None, :, None, None]).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(50, 3, 4, 4))
        f["y"] = np.zeros(1001, np.int64)
    pers = ["feature", "channel"]
    fits = [[str(tmp_path / "s.h5"), per, str(tmp_path / f"cache-{per}")] for per in pers]
    got = each_in_one_launch(3, STATS, fits)
    for per, stats in zip(pers, got):
        axes = (0,) if per == "feature" else (0, 2, 3)
        np.testing.assert_allclose(stats["mean"], x.astype(np.float64).mean(axis=axes), rtol=1e-9)
        np.testing.assert_allclose(stats["std"], x.astype(np.float64).std(axis=axes), rtol=1e-7)
        assert len(list((tmp_path / f"cache-{per}").glob(".mpidl-stats-*.npz"))) == 1
    assert each_in_one_launch(2, STATS, fits) == got  # from the cache


def test_crop_and_flip_are_seeded_and_shape_preserving():
    from mpidl.data.preprocess import Pipeline

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    a = Pipeline(scale_uint8=True, crop=6, padding=1, flip=True, seed=4)((x, torch.zeros(2)))[0]
    b = Pipeline(scale_uint8=True, crop=6, padding=1, flip=True, seed=4)((x, torch.zeros(2)))[0]
    assert a.shape == (2, 3, 6, 6) and a.dtype == torch.float32 and torch.equal(a, b)
    assert float(a.max()) <= 1.0
    ev = Pipeline(scale_uint8=True, crop=6, train=False)((x, torch.zeros(2)))[0]
    torch.testing.assert_close(ev, x[:, :, 1:7, 1:7].float() / 255)


@needs_cuda
def test_crop_and_flip_on_cuda_never_synchronise_and_match_cpu():
    """Draws reach the device through pinned memory, asynchronously: under CUDA's sync debug
    mode "error" any synchronising call raises. Same seed, same crops and flips as on CPU."""
    from mpidl.data.preprocess import Pipeline

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    want = Pipeline(scale_uint8=True, crop=32, padding=4, flip=True, seed=9)((x, torch.zeros(64)))[0]
    pipe = Pipeline(scale_uint8=True, crop=32, padding=4, flip=True, seed=9)
    xc = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = pipe((xc, torch.zeros(64, device="cuda")))[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.is_cuda and torch.equal(got.cpu(), want)


def test_crop_and_flip_draw_from_the_pipeline_generator_alone():
    """The draws come from the pipeline's own generator (reseeded by the trainer each step),
    never the global one, and reach the batch's device (on CPU: no copy at all)."""
    from mpidl.data.preprocess import Pipeline, _on

    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.uint8).reshape(4, 3, 8, 8)
    pipe = Pipeline(scale_uint8=True, crop=6, padding=1, flip=True, seed=4)
    torch.manual_seed(0)
    a = pipe((x, torch.zeros(4)))[0]
    torch.manual_seed(1)
    pipe.generator.manual_seed(4)
    b = pipe((x, torch.zeros(4)))[0]
    assert torch.equal(a, b)
    host = torch.ones(3)
    assert _on(torch.device("cpu"), host) is host


# ---------------------------------------------------------------- tools
def test_synth_is_identical_for_any_rank_count(tmp_path):
    one = run(mpidl_cmd("data", "synth", "images", "--out", str(tmp_path / "a.h5"), "--rows", "9000"))
    three = mpirun(3, mpidl_cmd("data", "synth", "images", "--out", str(tmp_path / "b.h5"), "--rows", "9000"))
    assert one.returncode == 0 and three.returncode == 0, one.output + three.output
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["x"].shape == (9000, 3, 16, 16) and a["x"].dtype == np.uint8
        assert np.array_equal(a["x"][:], b["x"][:]) and np.array_equal(a["y"][:], b["y"][:])
        assert len(np.unique(a["y"][:])) == 10
    assert not list(tmp_path.glob("*partial*"))


SYNTH_ONCE = """
import sys
from mpidl.data import synth
print("ready", flush=True)
print("wrote" if synth.synth_images(sys.argv[1], 20000, size=8, if_missing=True) else "found", flush=True)
"""


def test_two_jobs_generating_the_same_file_take_turns(tmp_path):
    """Each writes a temporary file of its own name, renamed into place, while holding
    <file>.lock: the second waits, then finds the file written and writes nothing."""
    import fcntl
    import subprocess
    import time

    from conftest import clean_env

    out = tmp_path / "same.h5"
    with open(tmp_path / "same.h5.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both jobs start while a third writes
        jobs = [subprocess.Popen(pycode(SYNTH_ONCE) + [str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=clean_env()) for _ in range(2)]
        assert [j.stdout.readline() for j in jobs] == ["ready\n"] * 2
        time.sleep(1)
        assert all(j.poll() is None for j in jobs) and not out.exists()  # waiting, nothing written
    said = sorted(j.communicate(timeout=120)[0].strip() for j in jobs)
    assert all(j.returncode == 0 for j in jobs) and said == ["found", "wrote"], said
    with h5py.File(out) as f:
        assert f["x"].shape == (20000, 3, 8, 8) and f["y"].shape == (20000,)
        run(pycode(f"from mpidl.data import synth; synth.synth_images({str(tmp_path / 'ref.h5')!r}, 20000, size=8)"))
        with h5py.File(tmp_path / "ref.h5") as ref:
            assert np.array_equal(f["x"][:], ref["x"][:]) and np.array_equal(f["y"][:], ref["y"][:])
    assert not list(tmp_path.glob("*partial*"))


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    r = run(pycode("import sys\nfrom mpidl.data import synth\n"
                   "synth._fill = lambda *a: 1 / 0\n"
                   f"synth.synth_images({str(tmp_path / 'f.h5')!r}, 100)"))
    assert r.returncode != 0 and "ZeroDivisionError" in r.stderr
    assert not (tmp_path / "f.h5").exists() and not list(tmp_path.glob("*partial*"))


def test_synth_tabular_chunked_compressed(tmp_path):
    r = mpirun(2, mpidl_cmd("data", "synth", "tabular", "--out", str(tmp_path / "t.h5"), "--rows", "10000",
                            "--classes", "3", "--chunk-rows", "1000", "--compression", "lzf"))
    assert r.returncode == 0, r.output
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["x"].chunks == (1000, 16) and f["x"].compression == "lzf"
        x, y = f["x"][:], f["y"][:]
    # the rule is learnable: least squares on one-hot targets beats chance by far
    onehot = np.eye(3)[y]
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], onehot, rcond=None)
    acc = (np.c_[x, np.ones(len(x))] @ w).argmax(1) == y
    assert acc.mean() > 0.8


def test_convert_and_inspect(tmp_path):
    np.savez(tmp_path / "arr.npz", images=np.zeros((300, 3, 8, 8), np.uint8), labels=np.arange(300))
    r = run(mpidl_cmd("data", "convert", str(tmp_path / "arr.npz"), "--out", str(tmp_path / "c.h5"),
                      "--keys", "images", "labels"))
    assert r.returncode == 0, r.output
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["images"].shape == (300, 3, 8, 8) and f["images"].chunks[1:] == (3, 8, 8)
        assert np.array_equal(f["labels"][:], np.arange(300))
    r = run(mpidl_cmd("data", "inspect", str(tmp_path / "c.h5")))
    assert r.returncode == 0 and "images: shape (300, 3, 8, 8) uint8" in r.stdout and "advice:" in r.stdout
    np.save(tmp_path / "a.npy", np.zeros(10))
    np.save(tmp_path / "b.npy", np.zeros(11))
    r = run(mpidl_cmd("data", "convert", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out",
                      str(tmp_path / "bad.h5")))
    assert r.returncode == 2 and "different lengths" in r.stderr and not (tmp_path / "bad.h5").exists()


def test_convert_names_two_arrays_x_and_y(tmp_path):
    """Two .npy files without --keys become x and y, the datasets training and `data check` read
    by default (they were named after the files: 'dataset 'x' not found' at the first step);
    --keys still names them, and one or three files keep their files' names."""
    from mpidl.data import H5Source, tools

    np.save(tmp_path / "features.npy", np.arange(40, dtype=np.float32).reshape(20, 2))
    np.save(tmp_path / "labels.npy", np.arange(20) % 3)
    np.save(tmp_path / "weights.npy", np.ones(20, np.float32))
    pair = [str(tmp_path / "features.npy"), str(tmp_path / "labels.npy")]
    assert list(tools.convert(pair, str(tmp_path / "xy.h5"))) == ["x", "y"]
    src = H5Source(str(tmp_path / "xy.h5")).validate()  # default keys: x, y
    assert len(src) == 20 and src.shapes["x"] == (2,)
    assert list(tools.convert(pair, str(tmp_path / "named.h5"), keys=["inputs", "targets"])) == ["inputs", "targets"]
    assert list(tools.convert(pair[:1], str(tmp_path / "one.h5"))) == ["features"]
    assert list(tools.convert([*pair, str(tmp_path / "weights.npy")], str(tmp_path / "three.h5"))) == \
        ["features", "labels", "weights"]


def test_convert_reads_npz_arrays_in_blocks(tmp_path, monkeypatch):
    """An .npz member is read a block of rows at a time (np.load would inflate it whole), C or
    Fortran order, stored or deflated; a member shorter than its header is one line, and a
    failed conversion leaves nothing behind."""
    import tracemalloc
    import zipfile

    from mpidl.data import tools

    rows = np.arange(4096 * 1024, dtype=np.int64).reshape(4096, 1024)  # 32 MiB
    np.savez_compressed(tmp_path / "big.npz", x=rows, f=np.asfortranarray(rows[:, :2].astype(np.float32)))
    monkeypatch.setattr(tools, "COPY_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        written = tools.convert([str(tmp_path / "big.npz")], str(tmp_path / "big.h5"), chunk_rows=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == {"x": ((4096, 1024), "int64"), "f": ((4096, 2), "float32")}
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held at once for a 32 MiB array read in 1 MiB blocks"
    with h5py.File(tmp_path / "big.h5") as f:
        assert np.array_equal(f["x"][:], rows) and np.array_equal(f["f"][:], rows[:, :2])

    header = tmp_path / "short.npy"  # a header for 300 rows, and 100 rows of data
    np.save(header, np.zeros((300, 4), np.float32))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:
        z.writestr("x.npy", header.read_bytes()[:-200 * 16])
    r = run(mpidl_cmd("data", "convert", str(tmp_path / "short.npz"), "--out", str(tmp_path / "short.h5")))
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: {tmp_path / 'short.npz'}: array 'x' ends before its 300 rows (a truncated .npz)", r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5", "big.npz", "short.npy", "short.npz"]


def _gzip_file(path, chunk: bytes) -> tuple[int, int]:
    """A gzip-chunked dataset whose first chunk's stored bytes are `chunk`; (chunk bytes, rows)."""
    import zlib

    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", data=np.ones((256, 64), np.float32), chunks=(64, 64), compression="gzip")
        f["y"] = np.zeros(256, np.int64)
        d.id.write_direct_chunk((0, 0), zlib.compress(chunk))
    return 64 * 64 * 4, 256


@pytest.mark.parametrize("inflated,why", [
    (64 << 20, "a crafted chunk: 64 MiB of zeros in a few KiB"),
    (1000, "a chunk that inflates short"),
])
def test_a_gzip_chunk_is_inflated_no_further_than_its_size(tmp_path, inflated, why):
    import tracemalloc

    from mpidl.data import H5Source

    path = tmp_path / "bomb.h5"
    nbytes, rows = _gzip_file(path, bytes(inflated))
    src = H5Source(str(path)).validate()
    out = np.empty((rows, 64), np.float32)
    tracemalloc.start()
    try:
        with src.open(workers=1) as reader, pytest.raises(BadInput) as e:
            reader.read("x", 0, rows, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value) == f"{path}: dataset 'x': chunk (0, 0) does not inflate to the chunk's {nbytes} bytes " \
                           "(gzip): a damaged file", why
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB made for a {nbytes}-byte chunk"


def test_a_crafted_gzip_chunk_is_one_line_and_exit_2(tmp_path):
    _gzip_file(tmp_path / "bomb.h5", bytes(64 << 20))
    r = mpirun(2, mpidl_cmd("data", "check", str(tmp_path / "bomb.h5")), timeout=120)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.output[-3000:]
    assert f"{tmp_path / 'bomb.h5'}: dataset 'x': chunk (0, 0) does not inflate" in errors[0], errors[0]

