"""The MLP trainer on CUDA vs CPU: device, epoch time and validation AUC, same data and seed.

    python benchmarks/mlp_device.py [--rows 200000] [--epochs 3]

Needs only numpy and torch (runs on a GPU machine without the rest of the platform).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.core.mlp import MlpConfig, MlpModel, fit  # noqa: E402


def synthetic(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(rows, 16))
    numeric[rng.random(numeric.shape) < 0.02] = np.nan
    cats = np.column_stack([rng.integers(0, n, rows) for n in (5, 20, 50, 200)]).astype(float)
    logit = (
        np.nan_to_num(numeric[:, 0]) * 1.5
        - np.nan_to_num(numeric[:, 1]) ** 2
        + np.sin(np.nan_to_num(numeric[:, 2]) * 2)
        + (cats[:, 0] == 2) * 1.2
        - (cats[:, 1] % 3 == 0) * 0.8
    )
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return np.column_stack([numeric, cats]), y, [0] * 16 + [5, 20, 50, 200]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    order = np.argsort(p)
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    x, y, levels = synthetic(args.rows)
    cut = int(0.8 * len(y))
    config = MlpConfig(
        hidden=[256, 128], epochs=args.epochs, batch_size=args.batch_size, patience=99
    )
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    results = {}
    for device in devices:
        epochs: list[float] = []
        started = time.perf_counter()
        model = fit(
            x[:cut],
            y[:cut],
            x[cut:],
            y[cut:],
            levels,
            "binary",
            config,
            device=device,
            on_epoch=lambda r, sink=epochs: sink.append(r.seconds),
        )
        total = time.perf_counter() - started
        path = Path(f"mlp-{device}.npz")
        model.save(path)
        reloaded = MlpModel.load(path)
        results[device] = {
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "epoch_seconds_median": statistics.median(epochs),
            "epoch_seconds": epochs,
            "total_seconds": total,
            "valid_auc_numpy_forward": auc(y[cut:], reloaded.predict(x[cut:])),
        }
        path.unlink()
    print(
        f"torch {torch.__version__}, rows {args.rows}, epochs {args.epochs}, "
        f"batch {args.batch_size}"
    )
    for device, r in results.items():
        print(
            f"{device:5} {r['device_name']:<28} epoch p50 {r['epoch_seconds_median']:.3f}s  "
            f"AUC {r['valid_auc_numpy_forward']:.4f}"
        )
    if "cuda" in results:
        ratio = results["cpu"]["epoch_seconds_median"] / results["cuda"]["epoch_seconds_median"]
        print(f"cpu / cuda epoch time: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
