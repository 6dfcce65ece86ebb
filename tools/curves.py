"""Training curves of a run: is it learning? Each stage's training loss (raw, and smoothed) and its
validation numbers (the AE's PSNR on held-out videos, the diffusion stages' loss on a fixed held-out
batch at fixed noise) against optimizer steps, read from <run>/metrics.jsonl into one PNG.

    python tools/curves.py runs/tiny                      # writes runs/tiny/curves.png
    python tools/curves.py checkpoints/shapes-tiny --out assets/curves.png
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no screen needed
import matplotlib.pyplot as plt  # noqa: E402

# The stage files (data.py) live one folder up: make them importable from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import fail  # noqa: E402

STAGES = ("ae", "content", "motion")  # in training order, one row each


def smooth(values, weight=0.9):
    """An exponential moving average, debiased as Adam's moments are (TensorBoard's smoothing): the k-th
    point is sum_i w^(k-i) (1-w) x_i / (1 - w^(k+1)), so the first points are not pulled towards 0."""
    average, smoothed = 0.0, []
    for k, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** (k + 1)))
    return smoothed


def read_metrics(path):
    """metrics.jsonl -> {stage: {"loss": [(step, loss)], "<val name>": [(step, value)]}}."""
    curves = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            values = json.loads(line)
            stage, step = values.pop("stage"), values.pop("step")
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{path}, line {number}, is not a metrics line of data.train: {line[:80]!r}") from None
        for name in ["loss", *(k for k in values if k.startswith("val_"))]:
            if name in values:
                curves.setdefault(stage, {}).setdefault(name, []).append((step, values[name]))
    if not curves:
        raise ValueError(f"{path} holds no metrics yet: train a stage into its run first")
    return curves


def plot(curves, path, title):
    """One row per stage: training loss (log scale, raw and smoothed) | each validation number."""
    stages = [stage for stage in STAGES if stage in curves] + [s for s in curves if s not in STAGES]
    figure, axes = plt.subplots(len(stages), 2, figsize=(10, 2.8 * len(stages)), squeeze=False)
    for (loss_axis, val_axis), stage in zip(axes, stages):
        if "loss" in curves[stage]:
            steps, losses = zip(*curves[stage]["loss"])
            loss_axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="logged")
            loss_axis.plot(steps, smooth(losses), color="tab:blue", label="smoothed (EMA 0.9)")
            loss_axis.set_yscale("log")
            loss_axis.legend(fontsize=8)
        loss_axis.set(title=f"{stage}: training loss", xlabel="step")
        names = [name for name in curves[stage] if name.startswith("val_")]
        for name in names:
            steps, values = zip(*curves[stage][name])
            val_axis.plot(steps, values, marker="o", label=name)
        val_axis.set(title=f"{stage}: held-out " + (", ".join(names) or "(none logged)"), xlabel="step")
        if names:
            val_axis.legend(fontsize=8)
        for axis in (loss_axis, val_axis):
            axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}: {', '.join(stages)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: <run>/curves.png)")
    args = parser.parse_args(argv)
    metrics = Path(args.run) / "metrics.jsonl"
    if not metrics.is_file():
        fail(f"{metrics} not found: name a run directory that a stage has trained into")
    try:
        plot(read_metrics(metrics), args.out or Path(args.run) / "curves.png", str(Path(args.run)))
    except (ValueError, OSError) as e:
        fail(e)


if __name__ == "__main__":
    main()
