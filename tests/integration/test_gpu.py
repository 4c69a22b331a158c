"""GPU workers (marker ``gpu``: run with ``pytest -m gpu`` on a machine with CUDA and Ray GPUs).

Not skipped when CUDA is missing: selecting the marker on a GPU-less machine fails loudly.
"""

from __future__ import annotations

import pytest
import torch

from gradhub.client.client import Client

from ..conftest import final_params
from .test_exactness import BATCH, OPTIMIZERS, STEPS, reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    import ray

    from gradhub.server.app import Server
    from gradhub.server.config import ServerConfig

    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    with Server(ServerConfig(port=0, data_dir=tmp_path_factory.mktemp("gpu"))) as server:
        yield server
    ray.shutdown()


@pytest.mark.parametrize("mode", ["ps-sync", "allreduce"])
@pytest.mark.parametrize("workers", [1, 2])
def test_cuda_workers_match_single_process_pytorch(gpu_server, tmp_path, workers, mode):
    """allreduce: one worker owns the GPU (NCCL), or two share it (Gloo on CUDA tensors)."""
    with Client(gpu_server.address) as client:
        spec = {"name": f"gpu-{mode}-{workers}", "mode": mode, "workers": workers,
                "resources": {"cpus": 1, "gpus": 1 / workers}, "model": {"name": "mlp", "args": {"hidden": [32]}},
                "dataset": "digits", "optimizer": OPTIMIZERS["adam"], "batch_size": BATCH, "steps": STEPS, "seed": 7}
        info = client.submit(spec).wait(timeout=300)
        params = final_params(client, info, tmp_path)
    expected = reference(workers, OPTIMIZERS["adam"])
    worst = max(float((params[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-4, f"CUDA run differs from CPU PyTorch by {worst:.3g}"


@pytest.mark.parametrize("workers", [1, 2])
def test_cuda_workers_push_buckets_to_a_sharded_server_and_match_single_process_pytorch(gpu_server, tmp_path,
                                                                                        workers):
    """ps-sync with two shards; the gradient in two buckets (the first layer's weight, then the
    rest) pushed while backward runs on the GPU, each to the shards that hold its pieces."""
    with Client(gpu_server.address) as client:
        spec = {"name": f"gpu-shards-{workers}", "mode": "ps-sync", "workers": workers, "ps_shards": 2,
                "bucket_mb": 0.004, "resources": {"cpus": 1, "gpus": 1 / workers},
                "model": {"name": "mlp", "args": {"hidden": [32]}}, "dataset": "digits",
                "optimizer": OPTIMIZERS["adam"], "batch_size": BATCH, "steps": STEPS, "seed": 7}
        info = client.submit(spec).wait(timeout=300)
        params = final_params(client, info, tmp_path)
    assert info.state == "SUCCEEDED", info.reason
    expected = reference(workers, OPTIMIZERS["adam"])
    worst = max(float((params[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-4, f"CUDA run with shards differs from CPU PyTorch by {worst:.3g}"


@pytest.mark.parametrize("mode", ["ps-sync", "allreduce"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_trains_a_batchnorm_model(gpu_server, tmp_path, mode, precision):
    """autocast on CUDA (fp16 with loss scaling); the checkpoint is the model's whole state_dict."""
    from pathlib import Path

    user_code = Path(__file__).parent / "user_code"
    with Client(gpu_server.address) as client:
        spec = {"name": f"gpu-{precision}-{mode}", "mode": mode, "workers": 1, "resources": {"cpus": 1, "gpus": 1},
                "model": "gh_zoo:bn_net", "dataset": "digits", "optimizer": {"name": "adam", "lr": 0.01},
                "batch_size": 32, "epochs": 3, "precision": precision, "working_dir": str(user_code),
                "sync_batchnorm": mode == "allreduce"}
        info = client.submit(spec).wait(timeout=300)
        params = final_params(client, info, tmp_path)
    assert info.metrics["val_accuracy"] > 0.8, info.metrics
    assert params["1.num_batches_tracked"].dtype == torch.int64 and int(params["1.num_batches_tracked"]) > 0
    assert all(bool(torch.isfinite(t).all()) for t in params.values() if t.dtype.is_floating_point)
