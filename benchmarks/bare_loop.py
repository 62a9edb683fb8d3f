"""The reference workload (shared/BENCHMARKS.md) as a bare PyTorch loop: the yardstick of ``benchmarks.reference``.

    python -m benchmarks.bare_loop --workload results/reference/workload.npz --out bare.json

No framework: one process, clients trained one after the other with every core as torch intra-op threads, FedAvg
over every state-dict entry, the global model evaluated on the test split after each round. Imports only torch and
numpy, so Flower's environment (``benchmarks.flower_app``) reuses the same model, local training and evaluation.

The workload file (written by ``benchmarks.reference prepare`` from this project's feature and partition stages)
holds ``x_train`` ``(n, 1, 64, 101)`` float32 normalised log-mels, ``y_train``, ``x_test``, ``y_test`` and the
clients' rows of the train split as ``parts`` (concatenated) with ``offsets`` (``len = clients + 1``).
:func:`spec_partition` redraws the partition from the labels as BENCHMARKS.md words it, so the harness can check
that the project's partition stage gives the same one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: BENCHMARKS.md: FedAvg, 30 rounds, 1 local epoch, batch 32, SGD lr 0.05, momentum 0.9, no weight decay.
ROUNDS, EPOCHS, BATCH, LR, MOMENTUM = 30, 1, 32, 0.05, 0.9
EVAL_BATCH = 256


@dataclass(frozen=True)
class Workload:
    """Normalised features, labels and the clients' train rows."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    parts: list[np.ndarray]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def save_workload(path: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  parts: list[np.ndarray]) -> None:
    """Write the workload file read by :func:`load_workload`."""
    offsets = np.cumsum([0, *(len(p) for p in parts)]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x_train.astype(np.float32), y_train=y_train.astype(np.int64),
             x_test=x_test.astype(np.float32), y_test=y_test.astype(np.int64),
             parts=np.concatenate(parts).astype(np.int64), offsets=offsets)


def load_workload(path: Path) -> Workload:
    """Read a workload file written by :func:`save_workload`."""
    with np.load(path) as z:
        offsets = z["offsets"]
        parts = [z["parts"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        return Workload(torch.from_numpy(z["x_train"]), torch.from_numpy(z["y_train"]),
                        torch.from_numpy(z["x_test"]), torch.from_numpy(z["y_test"]), parts)


def spec_partition(labels: np.ndarray, alpha: float = 0.5, num_clients: int = 10, seed: int = 0,
                   min_samples: int = 10) -> list[np.ndarray]:
    """BENCHMARKS.md's Dirichlet label skew, word for word, over rows in file-name order; sorted rows per client."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    while True:
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            rows = np.flatnonzero(labels == c)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions) * len(rows)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class CNN4(nn.Module):
    """BENCHMARKS.md's "cnn4": 4 × [Conv 3×3 → BN → ReLU → MaxPool 2], 1→16→32→64→64, global pool, Linear(64, k)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64), (64, 64)):
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2)))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def initial_model(num_classes: int) -> CNN4:
    """The initial global model: ``torch.manual_seed(0)`` then build."""
    torch.manual_seed(0)
    return CNN4(num_classes)


def local_train(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                server_round: int, client: int, epochs: int = EPOCHS) -> dict[str, torch.Tensor]:
    """E epochs of SGD from ``state`` on one client's rows; batch order from a generator seeded round*1000+client."""
    model.load_state_dict(state)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=0.0)
    generator = torch.Generator().manual_seed(server_round * 1000 + client)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            batch = order[start:start + BATCH]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: ``local_train``'s signature: where a client's update is computed is the caller's choice.
Train = Callable[..., dict[str, torch.Tensor]]


def fedavg(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Σ_k (n_k/n)·w_k over every entry (float64, clients in order), cast back; integer entries rounded."""
    total = sum(sizes)
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, n in zip(states, sizes, strict=True):
            acc.add_(state[key].to(torch.float64), alpha=n / total)
        out[key] = (acc if ref.is_floating_point() else torch.round(acc)).to(ref.dtype)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``state`` on ``(x, y)`` in eval mode."""
    model.load_state_dict(state)
    model.eval()
    correct = sum(int((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum())
                  for i in range(0, len(y), EVAL_BATCH))
    return correct / len(y)


def federate(work: Workload, rounds: int = ROUNDS, train: Train = local_train
             ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """FedAvg, every client every round, each client's update from ``train``; per-round test accuracy and seconds,
    and the final global state."""
    model = initial_model(work.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accuracies, seconds = [], []
    for server_round in range(1, rounds + 1):
        t0 = time.perf_counter()
        states, sizes = [], []
        for client, rows in enumerate(work.parts):
            index = torch.from_numpy(rows)
            states.append(train(model, state, work.x_train[index], work.y_train[index], server_round, client))
            sizes.append(len(rows))
        state = fedavg(states, sizes)
        accuracies.append(accuracy(model, state, work.x_test, work.y_test))
        seconds.append(time.perf_counter() - t0)
    return accuracies, seconds, state


def run(work: Workload, rounds: int = ROUNDS) -> dict[str, object]:
    """FedAvg, every client every round; per-round test accuracy and seconds."""
    started = time.perf_counter()
    accuracies, seconds, _ = federate(work, rounds)
    total = time.perf_counter() - started
    return {"accuracy": accuracies, "round_seconds": seconds, "total_seconds": total,
            "final_accuracy": accuracies[-1], "best_accuracy": max(accuracies),
            "best_round": int(np.argmax(accuracies)) + 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(load_workload(args.workload), args.rounds)
    result.update(framework="bare PyTorch loop", torch=torch.__version__, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"bare loop: final {result['final_accuracy']:.4f}, best {result['best_accuracy']:.4f}, "
          f"{result['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
