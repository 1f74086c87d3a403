"""
Pictures of a run's log.jsonl and of the study's conditions, drawn with matplotlib (an optional extra). Without
matplotlib each function says how to get it; the numbers stay in log.jsonl and study.json.

    python -m plot --run RUN_DIR      # or python -m plot RUN_DIR: RUN_DIR/curves.png from RUN_DIR/log.jsonl
"""

import sys
from pathlib import Path

import flags
import runlog
from fileio import InputError, atomic_open

try:  # the object-oriented API, no pyplot: no GUI backend is touched and no figure outlives its function
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError:
    Figure = None

HINT = "pip install matplotlib gives the pictures (the numbers are in log.jsonl and study.json)"
SCORE = {"paraphrase": "dev accuracy", "sonnet": "dev chrF"}
MARKER = {"fft": ("o", "FFT"), "lora": ("s", "LoRA")}
SETTINGS = {"run": (flags.REQUIRED, str, None, "a run folder, one holding log.jsonl")}


def read_log(run_dir):
    """(training lines, evaluation lines) of <run_dir>/log.jsonl (runlog.read_log), each a dict."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise InputError(f"{run_dir}: no such folder" if not Path(run_dir).is_dir()
                         else f"{path}: not found (a run folder holds log.jsonl)")
    records = runlog.read_log(path)
    return [r for r in records if "dev" not in r], [r for r in records if "dev" in r]


def save(fig, path):
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return Path(path)


def plot_run(run_dir):
    """<run_dir>/curves.png: loss and learning rate (right axis) per logged step, beside the dev score per
    evaluation. Returns its path, or None (after one line saying how to get matplotlib)."""
    train, evals = read_log(run_dir)
    if Figure is None:
        print(HINT)
        return None
    fig = Figure(figsize=(11, 4))
    loss_axis, dev_axis = fig.subplots(1, 2)
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0")
    loss_axis.set(xlabel="step", ylabel="training loss (mean since the previous line)", title=Path(run_dir).name)
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="C1", linestyle=":")
    lr_axis.set_ylabel("learning rate (dotted)")
    dev_axis.plot([r["step"] for r in evals], [r["dev"]["score"] for r in evals], marker="o", color="C2")
    dev_axis.set(xlabel="step", ylabel="dev score", title="dev score per evaluation")
    for axis in (loss_axis, dev_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = save(fig, Path(run_dir) / "curves.png")
    print(f"wrote {path}")
    return path


def study_figures(conditions, out_dir):
    """Per task, <out_dir>/curves-<task>.png and cost-quality-<task>.png from the study's conditions ({label, task,
    regime, method, score, ci, train_seconds, dev_curve, train_curve}). Returns the paths; [] without matplotlib."""
    if Figure is None:
        print(HINT)
        return []
    paths = []
    for task in dict.fromkeys(c["task"] for c in conditions):
        rows = [c for c in conditions if c["task"] == task]
        paths.append(save(curves_figure(rows, task), Path(out_dir) / f"curves-{task}.png"))
        paths.append(save(cost_quality_figure(rows, task), Path(out_dir) / f"cost-quality-{task}.png"))
    return paths


def curves_figure(rows, task):
    """Training loss per logged step beside dev score per epoch: a line per condition, LoRA dashed."""
    fig = Figure(figsize=(11, 4))
    train_axis, dev_axis = fig.subplots(1, 2)
    for c in rows:
        style = dict(linestyle="--" if c["method"] == "lora" else "-", label=c["label"])
        train_axis.plot(*zip(*c["train_curve"]), marker=".", **style)  # a one-step run is a dot
        dev_axis.plot(*zip(*c["dev_curve"]), marker="o", **style)
    train_axis.set(xlabel="step", ylabel="training loss", title=f"{task}: training loss per logged step")
    dev_axis.set(xlabel="epoch", ylabel=SCORE.get(task, "dev score"), title=f"{task}: dev score per epoch")
    dev_axis.legend(fontsize=8)
    for axis in (train_axis, dev_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def cost_quality_figure(rows, task):
    """Is LoRA, or DPO, worth what it costs? Dev score with its interval against train_seconds (log axis): a point
    per condition, FFT and LoRA marked apart, each labelled by its regime."""
    fig = Figure(figsize=(6, 4.5))
    axis = fig.subplots()
    for method, (marker, name) in MARKER.items():
        points = [c for c in rows if c["method"] == method]
        if points:
            axis.errorbar([c["train_seconds"] for c in points], [c["score"] for c in points], fmt=marker, capsize=3,
                          yerr=[[c["score"] - c["ci"][0] for c in points], [c["ci"][1] - c["score"] for c in points]],
                          label=name)
    for c in rows:
        axis.annotate(c["regime"], (c["train_seconds"], c["score"]), xytext=(5, 5), textcoords="offset points")
    axis.set_xscale("log")
    axis.set(xlabel="training seconds (log scale)", ylabel=f"{SCORE.get(task, 'dev score')} (interval)",
             title=f"{task}: quality against cost")
    axis.legend()
    return fig


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = ["--run", *argv] if len(argv) == 1 and not argv[0].startswith("-") else argv  # python -m plot DIR
    return flags.main(lambda config: plot_run(config["run"]), SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
