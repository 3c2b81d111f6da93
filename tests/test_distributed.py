"""Scale-out on Dask: scoring and PaDiM fitting on a LocalCluster of two worker processes give
what one machine gives, a worker killed mid-run loses nothing, and bad addresses fail fast."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time

import numpy as np
import pytest
import torch

from defectlens import Detector
from defectlens.components.gaussian import GaussianAccumulator
from defectlens.data.dataset import find_test_samples
from defectlens.distributed import score_on_cluster

from .conftest import IMAGE_SIZE, read_csv, run_cli

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes, as `--dask local:2` starts on this machine."""
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        silence_logs=40,
        env={"OMP_NUM_THREADS": "1"},
    )
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def _tree(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_predict_on_cluster_writes_what_a_local_run_writes(
    client, model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    broken = tmp_path / "inputs" / "broken.png"  # unreadable on the worker: listed, run goes on
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    inputs = [brick_root / "test", broken]
    local, remote = tmp_path / "local", tmp_path / "remote"
    code, _, _ = run_cli(monkeypatch, capsys, "predict", model_dir, *inputs, "--out", local, "-q")
    assert code == 1
    address = client.scheduler.address
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, *inputs, "--out", remote, "--dask", address, "-q"
    )
    assert code == 1 and "broken.png" in err
    rows = read_csv(remote / "results.csv")
    assert rows == read_csv(local / "results.csv")
    assert rows[-1]["predicted"] == "error" and "broken.png" in rows[-1]["error"]
    assert len(rows) == len(find_test_samples(brick_root)) + 1
    # Same pictures, byte for byte (the chunks are the model's batches, as locally).
    pictures = _tree(remote)
    assert pictures == _tree(local) and any(k.startswith("overlays/") for k in pictures)


def test_workers_read_fsspec_urls(client, fitted, model_dir, brick_root):
    folder = brick_root / "test" / "good"
    urls = [f"file://{p}" for p in sorted(folder.glob("*.png"))]
    results = list(score_on_cluster(client, model_dir, urls, pictures=False))
    local = fitted.predict(sorted(folder.glob("*.png")))
    assert [r.source for r in results] == urls
    assert [r.summary["score"] for r in results] == pytest.approx(
        [p.score for p in local], rel=1e-6
    )
    missing = list(score_on_cluster(client, model_dir, ["file:///no/such.png"], False))
    assert missing[0].summary is None and "no such file" in missing[0].error


def _model_copies_in(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith("defectlens-model-")]


def test_workers_keep_no_copy_of_the_model_on_disk(client, fitted, model_dir, brick_root, tmp_path):
    """Each run used to leave the model's files in a temporary folder on every worker (removed
    only by exit handlers, which a nanny's stop does not run): 16 MB a run, filling disks."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / "metrics.json").write_text("{}")  # other files: a model the workers have not loaded
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()

    def use_scratch(folder: str) -> None:
        tempfile.tempdir = folder

    def restore() -> None:
        tempfile.tempdir = None

    client.run(use_scratch, str(scratch))
    try:
        images = sorted((brick_root / "test" / "good").glob("*.png"))
        results = list(score_on_cluster(client, copy, images, pictures=False, chunk_size=2))
        assert all(r.error is None for r in results) and len(results) == len(images)
        assert [r.summary["score"] for r in results] == pytest.approx(
            [p.score for p in fitted.predict(images)], rel=1e-6
        )
        assert client.run(_model_copies_in, str(scratch)) == {w: [] for w in client.nthreads()}
    finally:
        client.run(restore)


def test_a_worker_killed_mid_run_loses_nothing(client, fitted, model_dir, brick_root):
    images = [str(s.path) for s in find_test_samples(brick_root)]
    expected = {p.source: p.score for p in fitted.predict(images)}
    stream = score_on_cluster(client, model_dir, images, False, chunk_size=1)
    first = next(stream)
    busy = [w for w, tasks in client.processing().items() if tasks]
    victim = busy[0] if busy else next(iter(client.nthreads()))
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)  # the nanny starts a new worker; Dask reruns its tasks
    results = [first, *stream]
    assert [r.source for r in results] == images  # each input exactly once, in order
    assert all(r.error is None for r in results)
    scores = [r.summary["score"] for r in results]
    assert scores == pytest.approx([expected[i] for i in images], rel=1e-6)


def test_padim_fitted_on_the_cluster_equals_a_local_fit(
    client, fitted, brick_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "model"
    address = client.scheduler.address
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "fit", brick_root, "--image-size", IMAGE_SIZE, "--batch-size", 8,
        "--out", out, "--dask", address, "-q",
    )  # fmt: skip
    assert code == 0, stdout
    remote = Detector.load(out)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    local_state, remote_state = fitted.model_.fitted_state(), remote.model_.fitted_state()
    assert local_state.keys() == remote_state.keys()
    for name in local_state:
        assert relative(remote_state[name], local_state[name]) <= 1e-6, name
    assert remote.thresholds_.image == pytest.approx(fitted.thresholds_.image, rel=1e-6)
    assert remote.n_fit_images_ == fitted.n_fit_images_


def test_partial_sums_add_up_to_one_pass():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(6, 5, 40)))  # (P, C, B)
    whole = GaussianAccumulator()
    whole.update(features[:, :, :10])
    whole.update(features[:, :, 10:])
    first = GaussianAccumulator()
    first.update(features[:, :, :10])
    rest = GaussianAccumulator(first.shift)
    rest.update(features[:, :, 10:25])
    last = GaussianAccumulator(first.shift)
    last.update(features[:, :, 25:])
    merged = GaussianAccumulator().merge(first).merge(rest).merge(last)
    assert merged.n == 40 and first.n == 10  # merging copies: the parts are unchanged
    for shrinkage in ("none", "ledoit_wolf"):
        assert torch.allclose(merged.covariance(shrinkage), whole.covariance(shrinkage))
    assert torch.allclose(merged.mean(), whole.mean())
    other = GaussianAccumulator()
    other.update(features[:, :, 10:])
    with pytest.raises(ValueError, match="different shifts"):
        GaussianAccumulator().merge(first).merge(other)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_scheduler_is_a_quick_clear_error(
    model_dir, brick_root, tmp_path, monkeypatch, capsys
):
    started = time.monotonic()
    out = tmp_path / "never"
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", model_dir, brick_root / "test", "--out", out,
        "--dask", f"tcp://127.0.0.1:{_free_port()}", "-q",
    )  # fmt: skip
    assert code == 2 and "cannot connect to a Dask scheduler" in err
    assert time.monotonic() - started < 15
    assert not out.exists()  # nothing written before the cluster answered


def test_dask_options_refuse_what_they_cannot_do(brick_root, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "fit", brick_root, "--method", "spade", "--out", tmp_path / "m",
        "--dask", "local:1",
    )  # fmt: skip
    assert code == 2 and "padim only" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", tmp_path / "m", brick_root, "--out", tmp_path / "r",
        "--chunk-size", "4",
    )  # fmt: skip
    assert code == 2 and "--chunk-size is for --dask" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", tmp_path / "m", brick_root, "--out", tmp_path / "r",
        "--dask", "local:0",
    )  # fmt: skip
    assert code == 2 and "between 1 and 256" in err


def test_local_workers_started_by_the_command(model_dir, brick_root, tmp_path, monkeypatch, capsys):
    images = sorted((brick_root / "test" / "good").glob("*.png"))[:4]
    code, _, _ = run_cli(
        monkeypatch, capsys, "predict", model_dir, *images, "--out", tmp_path / "a",
        "--no-images", "--dask", "local:1", "-q",
    )  # fmt: skip
    assert code == 0
    code, _, _ = run_cli(
        monkeypatch, capsys, "predict", model_dir, *images, "--out", tmp_path / "b",
        "--no-images", "-q",
    )  # fmt: skip
    assert read_csv(tmp_path / "a" / "results.csv") == read_csv(tmp_path / "b" / "results.csv")
