"""User code shipped with the job: ``working_dir`` is packed by the client, stored by the server
and carried to the Ray workers by their runtime_env; factories are imported from it there.

The package is written to tmp_path only, so neither the server nor Ray's workers could import
it any other way; the trained checkpoint then loads into the same factory's model here.
"""

from __future__ import annotations

import importlib
import random
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradhub.client.client import Client, pack_working_dir
from gradhub.proto.contract.errors import SpecError
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import final_params

PACKAGE = "gh_wd_models"  # a name nothing else on the machine has
MODULE = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def tiny(hidden=8):
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


    def data(n=512):
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(n, 64, generator=g)
        teacher = torch.randn(64, 10, generator=g)
        return TensorDataset(x, (x @ teacher).argmax(1))
""")


@pytest.fixture
def user_code(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(MODULE)
    (root / "README.txt").write_text("not code, shipped along\n")
    (root / PACKAGE / "__pycache__").mkdir()  # skipped by the packer
    (root / PACKAGE / "__pycache__" / "junk.pyc").write_bytes(b"\0" * 64)
    return root


@pytest.fixture
def user_module(user_code: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The same package imported in the test process (removed again afterwards)."""
    monkeypatch.syspath_prepend(str(user_code))
    yield importlib.import_module(PACKAGE)
    sys.modules.pop(PACKAGE, None)


def test_the_package_is_not_importable_without_working_dir() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(PACKAGE)


@pytest.mark.timeout(180)
def test_a_job_trains_a_model_from_its_working_dir(client: Client, user_code: Path, user_module,
                                                   server, tmp_path: Path) -> None:
    spec = {
        "name": "working-dir", "mode": "ps-sync", "workers": 2, "resources": {"cpus": 0.5},
        "working_dir": str(user_code),
        "model": {"factory": f"{PACKAGE}:tiny", "args": {"hidden": 16}},
        "dataset": {"factory": f"{PACKAGE}:data"},
        "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 32, "epochs": 3,
    }
    job = client.submit(spec)
    stored = Path(server.manager.db.get(job.id).working_dir)
    assert stored.is_file() and stored.suffix == ".zip"  # the server keeps the packed folder
    info = job.wait(timeout=150)
    assert info.state == "SUCCEEDED", info.reason
    # 512 samples, val_fraction 0.2 -> 410 to train on; 2 x 32 per step
    assert info.total_steps == 3 * (410 // 64)
    assert info.metrics["val_accuracy"] > 0.3  # learnt something: chance is 0.1

    import zipfile

    with zipfile.ZipFile(stored) as zf:
        assert sorted(zf.namelist()) == ["README.txt", f"{PACKAGE}/__init__.py"]

    model = user_module.tiny(16)
    model.load_state_dict(final_params(client, info, tmp_path), strict=True)
    x, y = user_module.data()[:]
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.3


def test_a_working_dir_over_the_limit_is_refused(user_code: Path) -> None:
    (user_code / "weights.bin").write_bytes(b"\1" * 5000)
    with pytest.raises(SpecError) as err:
        pack_working_dir(user_code, limit=4096)
    assert err.value.field == "working_dir"
    assert str(user_code) in str(err.value) and "4096 bytes" in str(err.value), str(err.value)
    assert len(pack_working_dir(user_code, limit=1 << 20)) < 5000  # fits a larger limit


def test_a_working_dir_of_70_mib_reaches_the_server(tmp_path: Path) -> None:
    """Over gRPC's usual 64 MiB message limit, under the documented 100 MiB: accepted whole."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(random.Random(0).randbytes(70 << 20))  # incompressible
    config = ServerConfig(port=0, data_dir=tmp_path / "data")
    with Server(config, launcher=ExternalLauncher()) as server, Client(server.address) as client:
        job = client.submit({"name": "big-dir", "model": "mlp", "dataset": "digits", "steps": 1,
                             "working_dir": str(folder)})
        assert Path(server.manager.db.get(job.id).working_dir).stat().st_size > 70 << 20
        client.cancel(job.id)


def test_a_working_dir_that_is_not_a_folder_is_refused(client: Client, tmp_path: Path) -> None:
    before = len(client.list_jobs())
    with pytest.raises(SpecError) as err:
        client.submit({"name": "no-dir", "model": "mlp", "dataset": "digits", "steps": 1,
                       "working_dir": str(tmp_path / "missing")})
    assert err.value.field == "working_dir" and "is not a folder" in str(err.value)
    assert len(client.list_jobs()) == before


def test_the_server_refuses_a_zip_bomb_and_keeps_nothing(tmp_path: Path) -> None:
    """A client that skips pack_working_dir's checks meets the server's: INVALID_ARGUMENT naming
    working_dir, no job, no file."""
    import io
    import zipfile

    import grpc

    from gradhub.proto.contract.spec import JobSpec
    from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(200 << 20))  # ~200 KB packed, 200 MiB unpacked
    spec = JobSpec.from_dict({"name": "bomb", "model": "mlp", "dataset": "digits", "steps": 1})
    config = ServerConfig(port=0, data_dir=tmp_path / "data")
    with Server(config, launcher=ExternalLauncher()) as server, grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_json=spec.to_json(), working_dir_zip=buf.getvalue()),
                           timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("working_dir: unpacks to more than")
        assert not stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs
        working_dirs = tmp_path / "data" / "working_dirs"
        assert not working_dirs.exists() or not list(working_dirs.iterdir())
