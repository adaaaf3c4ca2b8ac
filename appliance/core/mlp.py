"""A tabular MLP: preprocessing fitted on the training rows, a small torch network, and a
numpy-only forward pass for serving (no torch, no training code, no pickle at load time).

Input is the same float64 matrix LightGBM takes: numeric columns as numbers (NaN = missing)
and categorical columns as level codes (NaN = missing or unseen). Numeric columns are
standardised with the training rows' mean and std and missing values imputed with that mean;
categorical columns go through embeddings, with index 0 for missing/unseen levels.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OBJECTIVES = ("binary", "multiclass", "regression")


@dataclass
class MlpConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 50
    weight_decay: float = 1e-5
    patience: int = 5
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> MlpConfig:
        """Checked construction: every error names the parameter."""
        import math

        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown MLP parameter(s) {unknown}; known: {sorted(known)}")
        values = dict(params)
        hidden = values.get("hidden", [64, 32])
        if isinstance(hidden, str):  # 64x32
            try:
                hidden = [int(w) for w in hidden.split("x")]
            except ValueError:
                raise ValueError(f"hidden {hidden!r}: widths like 64x32") from None
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = [hidden]
        if (
            not isinstance(hidden, list)
            or not hidden
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
        ):
            raise ValueError(f"hidden {hidden!r}: positive integer widths, like 64x32")
        values["hidden"] = hidden
        for key, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("seed", 0)):
            value = values.get(key)
            if key in values and (
                not isinstance(value, int) or isinstance(value, bool) or value < low
            ):
                raise ValueError(f"{key} {value!r}: an integer of at least {low}")
        for key in ("lr", "weight_decay", "dropout"):
            value = values.get(key)
            if key in values and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{key} {value!r}: a finite number")
        config = cls(**values)
        if config.lr <= 0:
            raise ValueError(f"lr {config.lr!r}: must be positive")
        if config.weight_decay < 0:
            raise ValueError(f"weight_decay {config.weight_decay!r}: must not be negative")
        if not 0 <= config.dropout < 1:
            raise ValueError(f"dropout {config.dropout!r}: must be in [0, 1)")
        return config


@dataclass
class Layout:
    """Which matrix columns are numeric and how many levels each categorical one has."""

    levels: list[int]  # 0 for a numeric column, else the number of categorical levels
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, x: np.ndarray, levels: list[int]) -> Layout:
        means, stds = [], []
        for j, n in enumerate(levels):
            if n:
                means.append(0.0)
                stds.append(1.0)
                continue
            column = x[:, j]
            finite = column[np.isfinite(column)]
            mean = float(finite.mean()) if finite.size else 0.0
            std = float(finite.std()) if finite.size else 1.0
            means.append(mean)
            stds.append(std if std > 1e-12 else 1.0)
        return cls(levels=levels, means=means, stds=stds)

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(standardised numeric float32, categorical indices int64, count of imputed cells)."""
        numeric_cols = [j for j, n in enumerate(self.levels) if not n]
        cat_cols = [j for j, n in enumerate(self.levels) if n]
        num = x[:, numeric_cols].astype(np.float64)
        missing = ~np.isfinite(num)
        means = np.asarray([self.means[j] for j in numeric_cols])
        stds = np.asarray([self.stds[j] for j in numeric_cols])
        num = np.where(missing, means, num)
        num = ((num - means) / stds).astype(np.float32)
        cat = x[:, cat_cols]
        idx = np.zeros(cat.shape, dtype=np.int64)
        for k, j in enumerate(cat_cols):
            codes = cat[:, k]
            ok = np.isfinite(codes) & (codes >= 0) & (codes < self.levels[j])
            idx[ok, k] = codes[ok].astype(np.int64) + 1
        return num, idx, int(missing.sum())


def _embedding_dim(levels: int) -> int:
    return int(min(16, max(2, round(1.6 * (levels + 1) ** 0.56))))


def _outputs(objective: str, classes: int) -> int:
    return classes if objective == "multiclass" else 1


def _build(layout: Layout, config: MlpConfig, outputs: int) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Index 0 (missing or unseen level) is a fixed zero vector, not random noise.
            self.embeddings = nn.ModuleList(
                nn.Embedding(n + 1, _embedding_dim(n), padding_idx=0) for n in layout.levels if n
            )
            width = sum(1 for n in layout.levels if not n) + sum(
                _embedding_dim(n) for n in layout.levels if n
            )
            layers: list[nn.Module] = []
            for hidden in config.hidden:
                layers += [nn.Linear(width, int(hidden)), nn.ReLU(), nn.Dropout(config.dropout)]
                width = int(hidden)
            layers.append(nn.Linear(width, outputs))
            self.body = nn.Sequential(*layers)

        def forward(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
            parts = [num] + [emb(cat[:, k]) for k, emb in enumerate(self.embeddings)]
            return self.body(torch.cat(parts, dim=1))

    return Net()


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    valid_loss: float
    seconds: float


def pick_device(requested: str | None = None) -> str:
    """'cuda' when a GPU is there (or asked for), else 'cpu'."""
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    levels: list[int],
    objective: str,
    config: MlpConfig,
    classes: int = 2,
    device: str | None = None,
    on_epoch: Callable[[EpochReport], None] = lambda report: None,
) -> MlpModel:
    """Train with early stopping on the validation loss; returns the best epoch's model."""
    import torch
    from torch import nn

    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    device = pick_device(device)
    torch.manual_seed(config.seed)
    with _deterministic(device == "cpu"):
        layout = Layout.fit(x_train, levels)
        y_mean = float(y_train.mean()) if objective == "regression" else 0.0
        y_std = float(y_train.std() or 1.0) if objective == "regression" else 1.0

        def tensors(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any, Any, int]:
            num, cat, imputed = layout.transform(x)
            if objective == "multiclass":
                target = torch.as_tensor(y.astype(np.int64))
            else:
                target = torch.as_tensor(((y - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
            return (
                torch.as_tensor(num).to(device),
                torch.as_tensor(cat).to(device),
                target.to(device),
                imputed,
            )

        tn, tc, ty, imputed_train = tensors(x_train, y_train)
        vn, vc, vy, imputed_valid = tensors(x_valid, y_valid)
        net = _build(layout, config, _outputs(objective, classes)).to(device)
        loss_fn: nn.Module = {
            "binary": nn.BCEWithLogitsLoss(),
            "multiclass": nn.CrossEntropyLoss(),
            "regression": nn.MSELoss(),
        }[objective]
        optimiser = torch.optim.AdamW(
            net.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        best, best_state, stale, best_epoch = float("inf"), None, 0, 0
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            net.train()
            order = torch.randperm(len(ty), generator=generator).to(device)
            total = 0.0
            for start in range(0, len(ty), config.batch_size):
                batch = order[start : start + config.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(net(tn[batch], tc[batch]), ty[batch])
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            net.eval()
            with torch.no_grad():
                valid_loss = float(loss_fn(net(vn, vc), vy))
            if device == "cuda":
                torch.cuda.synchronize()
            on_epoch(EpochReport(epoch, total / len(ty), valid_loss, time.perf_counter() - started))
            if valid_loss < best - 1e-6:
                best, stale, best_epoch = valid_loss, 0, epoch
                best_state = {
                    k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()
                }
            else:
                stale += 1
                if stale >= config.patience:
                    break
        if best_state is None:
            raise ValueError(
                "the validation loss was never finite: the training diverged (try a lower lr) "
                f"or the validation split is empty ({len(y_valid)} rows)"
            )
        return MlpModel(
            layout=layout,
            config=config,
            objective=objective,
            classes=classes,
            weights=best_state,
            y_mean=y_mean,
            y_std=y_std,
            imputed={"train": imputed_train, "valid": imputed_valid},
            device=device,
            best_epoch=best_epoch,
        )


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic torch algorithms for the block; the setting is process-wide, so the
    caller gets back what it had."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class MlpModel:
    """A trained MLP as plain arrays: predicts with numpy alone."""

    layout: Layout
    config: MlpConfig
    objective: str
    classes: int
    weights: dict[str, np.ndarray]
    y_mean: float = 0.0
    y_std: float = 1.0
    imputed: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    best_epoch: int = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (binary: P(class 1); multiclass: one row per class) or values."""
        num, cat, _ = self.layout.transform(x)
        parts = [num.astype(np.float64)]
        for k in range(cat.shape[1]):
            parts.append(self.weights[f"embeddings.{k}.weight"][cat[:, k]])
        h = np.concatenate(parts, axis=1)
        linear = sorted({int(key.split(".")[1]) for key in self.weights if key.startswith("body.")})
        for i, index in enumerate(linear):
            h = h @ self.weights[f"body.{index}.weight"].T + self.weights[f"body.{index}.bias"]
            if i < len(linear) - 1:
                h = np.maximum(h, 0.0)  # dropout is identity at inference
        if self.objective == "binary":
            return 1.0 / (1.0 + np.exp(-h[:, 0]))
        if self.objective == "multiclass":
            e = np.exp(h - h.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return h[:, 0] * self.y_std + self.y_mean

    def save(self, path: Path) -> None:
        """One .npz file: the weights plus a JSON header; loads without pickle."""
        header = {
            "format": "appliance-mlp/1",
            "layout": asdict(self.layout),
            "config": asdict(self.config),
            "objective": self.objective,
            "classes": self.classes,
            "y_mean": self.y_mean,
            "y_std": self.y_std,
            "imputed": self.imputed,
            "device": self.device,
            "best_epoch": self.best_epoch,
        }
        arrays = {f"w:{k}": v for k, v in self.weights.items()}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> MlpModel:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("format") != "appliance-mlp/1":
                raise ValueError(f"{path}: not an appliance MLP model")
            weights = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
        return cls(
            layout=Layout(**header["layout"]),
            config=MlpConfig(**header["config"]),
            objective=header["objective"],
            classes=header["classes"],
            weights=weights,
            y_mean=header["y_mean"],
            y_std=header["y_std"],
            imputed=header["imputed"],
            device=header["device"],
            best_epoch=header.get("best_epoch", 0),
        )
