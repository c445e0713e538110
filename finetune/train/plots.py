"""plots/loss.png: train and eval loss against step, from metrics.jsonl."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LossCurves:
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)


def read_loss_curves(metrics_path: Path) -> LossCurves:
    """Train loss and eval loss per step from metrics.jsonl; a later record for the same step wins (the
    end-of-training eval repeats the last periodic one). Lines that do not parse (a kill mid-write) are skipped."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            train[int(rec["step"])] = float(rec["loss"])
        if "eval_loss" in rec:
            evals[int(rec["step"])] = float(rec["eval_loss"])
    t, e = sorted(train), sorted(evals)
    return LossCurves(t, [train[s] for s in t], e, [evals[s] for s in e])


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> Path:
    """Draw `out_png` (written under a temporary name, then renamed) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = read_loss_curves(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if curves.train_steps:
            ax.plot(curves.train_steps, curves.train_loss, label="train loss", color="tab:blue", linewidth=1.2)
        if curves.eval_steps:
            ax.plot(curves.eval_steps, curves.eval_loss, label="eval loss", color="tab:orange", marker="o",
                    linewidth=1.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title or "loss")
        ax.grid(alpha=0.3)
        ax.legend()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out_png.name + ".", suffix=".png", dir=out_png.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, out_png)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return out_png
