"""Measure and print the reference figures alone, so they can be sanity-checked.

Run from the repository root: ``python tests/bench/bench_baselines.py [--options]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from baselines import (
    gloo_allreduce_seconds,
    grpc_stream_throughput,
    plain_training_samples_per_second,
    raw_tcp_throughput,
)
from report import print_table, write_json
from torch import nn

NAME = "baselines"
COLUMNS = ["baseline", "figure", "unit", "vs raw TCP", "detail"]


def small_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=100, help="payload per direction, MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size, KiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (best is kept)")
    parser.add_argument("--world-size", type=int, default=2, help="Gloo ranks")
    parser.add_argument("--gloo-iters", type=int, default=10, help="timed all_reduce calls")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--out", type=Path, default=None, help="JSON file or folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    nbytes, chunk = args.mib * 2**20, args.chunk_kib * 2**10
    payload = f"{args.mib} MiB each way, {args.chunk_kib} KiB chunks, best of {args.repeats}"

    tcp = raw_tcp_throughput(nbytes, chunk, args.repeats)
    grpc_gbps = grpc_stream_throughput(nbytes, chunk, args.repeats)
    gloo_s = gloo_allreduce_seconds(nbytes, args.world_size, args.gloo_iters)

    torch.manual_seed(0)
    x, y = torch.randn(8192, 784), torch.randint(0, 10, (8192,))
    training = max(
        plain_training_samples_per_second(small_mlp, x, y, args.batch_size, args.steps)
        for _ in range(args.repeats)
    )

    rows: list[dict[str, Any]] = [
        {
            "baseline": "raw TCP push+pull",
            "figure": tcp,
            "unit": "GB/s",
            "vs raw TCP": 1.0,
            "detail": payload,
        },
        {
            "baseline": "plain gRPC stream push+pull",
            "figure": grpc_gbps,
            "unit": "GB/s",
            "vs raw TCP": grpc_gbps / tcp,
            "detail": payload,
        },
        {
            "baseline": "Gloo all_reduce",
            "figure": gloo_s * 1e3,
            "unit": "ms",
            "detail": f"{args.mib} MiB float32, {args.world_size} ranks, median of "
            f"{args.gloo_iters} ({nbytes / gloo_s / 1e9:.2f} GB/s algbw)",
        },
        {
            "baseline": "plain training (MLP 784-256-256-10)",
            "figure": training,
            "unit": "samples/s",
            "detail": f"SGD, batch {args.batch_size}, {args.steps} steps, best of {args.repeats}, "
            f"{torch.get_num_threads()} torch threads",
        },
    ]
    print_table("gradhub baselines (no gradhub involved)", rows, COLUMNS)
    path = write_json(
        NAME,
        {
            "params": {
                key: (str(value) if isinstance(value, Path) else value)
                for key, value in vars(args).items()
            },
            "results": {
                "raw_tcp_gbps": tcp,
                "grpc_stream_gbps": grpc_gbps,
                "grpc_vs_raw_tcp": grpc_gbps / tcp,
                "gloo_allreduce_seconds": gloo_s,
                "gloo_allreduce_algbw_gbps": nbytes / gloo_s / 1e9,
                "plain_training_samples_per_second": training,
            },
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
