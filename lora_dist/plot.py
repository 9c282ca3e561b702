"""The loss curve of a run (``loss_curve.png`` in the artifact), drawn by matplotlib."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve_png(metrics_file: Path, out: Path) -> Path:
    """Plot training loss per step and validation loss from ``metrics_file`` into ``out`` (PNG).

    Returns:
        ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: workers and CI have none
    from matplotlib.figure import Figure

    recs = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:red", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per completion token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
