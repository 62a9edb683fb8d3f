"""Federation tasks around :mod:`fedcore.plans.supervised`: load the federated data, the per-round table and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcore.config import DownstreamConfig
from fedcore.data import federated
from fedcore.data.federated import FederatedDataset
from tasks.common import pyplot, save_figure
from tasks.orchestration import task


@task(name="load federated data")
def load_federated_data(features_dir: Path, partition_file: Path, poison_dir: Path | None) -> FederatedDataset:
    """Feature store + partition + poison overlay -> per-client tensors."""
    return federated.load_federated_data(features_dir, partition_file, poison_dir)


ROUND_COLUMNS = (
    "round", "global_accuracy", "global_loss", "personalised_accuracy_mean", "personalised_accuracy_worst10",
    "train_loss_mean", "train_loss_min", "train_loss_max", "lr", "num_clients", "bytes_up", "bytes_down",
    "num_flagged", "num_rejected", "num_failed", "detect_precision", "detect_recall",
)


def rounds_tsv(history: Sequence[dict[str, float]], columns: Sequence[str] = ROUND_COLUMNS) -> str:
    """Per-round table (DVC plots source); a round without a column's metric gets ``nan``."""
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(_fmt(row.get(c, float("nan"))) for c in columns))
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def plot_rounds(history: Sequence[dict[str, float]], path: Path) -> None:
    """Accuracy and loss against round (PNG; DVC's HTML plots need a CDN, this does not)."""
    plt = pyplot()

    rounds = [row["round"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for key, label in [("global_accuracy", "global test"), ("personalised_accuracy_mean", "personalised mean"),
                       ("personalised_accuracy_worst10", "personalised worst 10%")]:
        if all(key in row for row in history):
            left.plot(rounds, [row[key] for row in history], marker=".", label=label)
    left.set_xlabel("round")
    left.set_ylabel("accuracy")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    left.legend()
    right.plot(rounds, [row["global_loss"] for row in history], marker=".", label="global test loss")
    right.plot(rounds, [row["train_loss_mean"] for row in history], marker=".", label="client train loss (mean)")
    right.set_xlabel("round")
    right.set_ylabel("cross-entropy")
    right.grid(alpha=0.3)
    right.legend()
    save_figure(fig, path)


def plot_downstream(history: Sequence[dict[str, float]], floor: dict[str, float], cfg: DownstreamConfig,
                    path: Path) -> None:
    """Self-supervised runs: each task's validation and test score against round, with the random-init floor.

    One panel per task (the selection metric, ``knn1`` by default), the best validation round marked; a last
    panel with the clients' mean training loss.
    """
    plt = pyplot()
    metric = cfg.select_metric
    tasks = [t.name for t in cfg.task_configs()]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.6 * (len(tasks) + 1), 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], tasks, strict=False):
        rows = [row for row in history if f"{name}/{metric}_val" in row]
        rounds = [row["round"] for row in rows]
        for split, style in (("val", "-"), ("test", "--")):
            ax.plot(rounds, [row[f"{name}/{metric}_{split}"] for row in rows], style, marker=".", label=split)
            if f"{name}/{metric}_{split}" in floor:
                ax.axhline(floor[f"{name}/{metric}_{split}"], color="grey", linestyle=":", linewidth=1)
        if rows:
            best = max(rows, key=lambda row: row[f"{name}/{metric}_val"])
            ax.plot([best["round"]], [best[f"{name}/{metric}_val"]], "r*", markersize=11, label="best (val)")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dotted: random init", title_fontsize=7)
    loss_ax = axes[0][-1]
    loss_ax.plot([row["round"] for row in history], [row["train_loss_mean"] for row in history], marker=".")
    loss_ax.set_title("clients' SSL loss (mean)")
    loss_ax.set_xlabel("round")
    loss_ax.grid(alpha=0.3)
    save_figure(fig, path)
