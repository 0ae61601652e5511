"""The comparison's files: ``comparison.csv`` (one row per run), ``comparison.md`` (mean +- std
over seeds per optimizer), ``loss_curves.png``, ``scores.png`` and ``grid.png``.

Plots use matplotlib's Agg backend (no display); the grid is composed with PIL: one row per
optimizer (its first seed's run), one column per prompt, every cell the image of the same
sampling seed.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from mixofshow.evaluate.progress import mean_std
from mixofshow.utils.io import atomic_write_bytes, atomic_write_text

__all__ = ["CSV_COLUMNS", "METRICS", "summarise", "write_csv", "write_markdown", "plot_losses", "plot_scores", "image_grid"]

CSV_COLUMNS = (
    "optimizer", "seed", "status", "run_dir", "lr_unet", "lr_text_encoder", "lr_source", "steps",
    "final_loss", "mean_loss_last_10", "heldout_loss", "seconds_per_step", "optimizer_step_seconds",
    "peak_memory_mb", "clip_t", "clip_t_cos", "clip_i", "clip_i_cos", "dino", "identity", "clip_model", "clip_weights",
)
# (row key, table heading, format)
METRICS = (
    ("clip_t", "CLIP-T", "{:.4f}"),
    ("clip_t_cos", "CLIP-T cos", "{:.4f}"),
    ("clip_i", "CLIP-I", "{:.4f}"),
    ("clip_i_cos", "CLIP-I cos", "{:.4f}"),
    ("dino", "DINO", "{:.4f}"),
    ("identity", "identity", "{:.3f}"),  # toy world only (evaluate/identity.py)
    ("final_loss", "final loss", "{:.4f}"),
    ("heldout_loss", "held-out loss", "{:.4f}"),
    ("seconds_per_step", "s / step", "{:.3f}"),
    ("optimizer_step_seconds", "opt. step ms", "ms"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"  # a diverged run
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def summarise(rows: list[dict[str, Any]], optimizers: list[str]) -> list[dict[str, Any]]:
    """Per optimizer: its lrs and, per metric, mean / std / n over its seeds."""
    out = []
    for name in optimizers:
        mine = [r for r in rows if r["optimizer"] == name]
        if not mine:
            continue
        entry = {"optimizer": name, "lr_unet": mine[0]["lr_unet"], "lr_text_encoder": mine[0]["lr_text_encoder"],
                 "lr_source": mine[0]["lr_source"], "seeds": [r["seed"] for r in mine]}
        for key, _, _ in METRICS:
            entry[key] = mean_std([r.get(key) for r in mine])
        out.append(entry)
    return out


def _cell(stats: dict[str, Any], fmt: str) -> str:
    mean, std = stats["mean"], stats["std"]
    if mean is None:
        return "n/a"
    if not math.isfinite(mean):
        return "nan (diverged)"
    if fmt == "ms":
        mean, std, fmt = mean * 1000, (std * 1000 if std is not None else None), "{:.2f}"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def write_markdown(summary: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    lines = [f"# Optimizer comparison: {info['config']}", ""]
    lines += [f"- {k}: {v}" for k, v in info["settings"].items()]
    lines += [f"- CLIP: {info['clip']}", f"- DINO: {info['dino']}", ""]
    heads = ["optimizer", "lr UNet / text", "lr from"] + [h for _, h, _ in METRICS]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for s in summary:
        cells = [f"`{s['optimizer']}`", f"{s['lr_unet']:.3g} / {s['lr_text_encoder']:.3g}", s["lr_source"]]
        cells += [_cell(s[k], f) for k, _, f in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std over seeds " + ", ".join(str(x) for x in summary[0]["seeds"]) if summary else "", ""]
    lines += [f"- {note}" for note in info.get("notes", [])]
    if info.get("grid"):
        lines += ["", "## Learning-rate grid (held-out loss, seed %s)" % info["grid"]["seed"], "",
                  "| optimizer | lr factor | lr UNet | held-out loss | chosen |", "|---|---|---|---|---|"]
        for g in info["grid"]["rows"]:
            lines.append(f"| `{g['optimizer']}` | {g['factor']:g} | {g['lr_unet']:.3g} | "
                         f"{_fmt(g['heldout_loss']) or 'n/a'} | {'yes' if g['chosen'] else ''} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict[str, list[tuple[int, list[float]]]], path: Path, ema: float = 0.9) -> None:
    """All runs' training losses on one chart: colour per optimizer, line style per seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, (name, runs) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for j, (seed, losses) in enumerate(runs):
            smooth, value = [], None
            for x in losses:  # None: a skipped step (train.nan_policy: skip-step)
                if x is not None and math.isfinite(x):
                    value = x if value is None else ema * value + (1 - ema) * x
                smooth.append(value if value is not None else math.nan)
            ax.plot(range(1, len(smooth) + 1), smooth, styles[j % len(styles)], color=color,
                    label=f"{name} (seed {seed})", linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (EMA {ema:g})")
    ax.set_title("Training loss, all runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)


def plot_scores(summary: list[dict[str, Any]], path: Path) -> None:
    """Bars with sample-std error bars, one panel per metric that has values."""
    plt = _pyplot()
    keys = [(k, h) for k, h, _ in METRICS if k in ("clip_t", "clip_i", "dino", "identity", "heldout_loss", "final_loss")
            and any(s[k]["mean"] is not None for s in summary)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.6), squeeze=False)
    names = [s["optimizer"] for s in summary]
    for ax, (key, head) in zip(axes[0], keys):
        means = [s[key]["mean"] if s[key]["mean"] is not None else 0.0 for s in summary]
        errs = [s[key]["std"] or 0.0 for s in summary]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(head + (" (lower is better)" if "loss" in key else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean ± std over seeds", fontsize=9)
    atomic_write_bytes(path, _figure_bytes(fig))
    plt.close(fig)


def image_grid(rows: list[tuple[str, list[Path | None]]], prompts: list[str], path: Path, cell: int = 128) -> None:
    """Rows of images (optimizer x prompt) with labels; a missing image is a grey cell."""
    from PIL import Image

    from mixofshow.sample.grid import save_grid

    def cell_image(image_path: Path | None) -> Image.Image:
        if image_path is None:
            return Image.new("RGB", (cell, cell), (200, 200, 200))
        with Image.open(image_path) as img:
            return img.convert("RGB").resize((cell, cell))

    save_grid(path, [[cell_image(p) for p in images] for _, images in rows],
              row_labels=[name for name, _ in rows], col_labels=prompts)
