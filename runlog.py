"""
log.jsonl: what a training run writes as it goes, one JSON object a line, for plotting (python -m plot) and for
reading a run that has no terminal (nohup, a scheduler, study.py --jobs). trainer.fit writes two kinds of line:

    {"step": 40, "epoch": 0.8, "loss": 0.61, "lr": 2e-05, "grad_norm": 3.1, "tokens_per_second": 5120.0,
     "elapsed": 12.5, "reward_accuracy": 0.75, "reward_margin": 0.4}           every --log_every steps
    {"step": 50, "epoch": 1, "elapsed": 15.0, "dev": {"accuracy": 0.8, ...}}   every dev evaluation

loss, grad_norm (before clipping) and the DPO family's reward figures are means over the steps since the line
before; epoch counts epochs done (fractions within one). Each line is appended and flushed at once, so a killed
run keeps every line it wrote, and a resumed run first drops the lines past its checkpoint, so that every step
is in the file once. With --wandb_project the same lines go to Weights & Biases.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import CHECKPOINT
from fileio import InputError, read_text


class Log:
    def __init__(self, run, progress):
        self.run, self.sums, self.steps = run, {}, 0
        self.path = Path(run.config["out_dir"]) / "log.jsonl"
        self.tokens, self.time = progress["real_tokens"], time.time()
        self.since_evaluation = [0.0, 0]  # the summed per-step loss and the steps since the last evaluation
        self.echo = not sys.stderr.isatty()  # tqdm's bar is off (nohup, a scheduler, study --jobs): print lines
        self.wandb = None
        if run.master and run.config["wandb_project"]:
            try:
                import wandb
            except ImportError:
                raise InputError(f"--wandb_project {run.config['wandb_project']}: the wandb package is not "
                                 f"installed (pip install wandb)") from None
            self.wandb = wandb.init(project=run.config["wandb_project"], config=run.config, name=self.path.parent.name)
        if run.master:  # a resumed run drops the lines written after its checkpoint: every step appears once
            kept = [line for line in read_log(self.path) if line["step"] <= progress["step"]]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def add(self, **values):
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += "grad_norm" in values  # one per optimizer step

    def write(self, progress, epoch, lr, t0):
        names = list(self.sums)
        totals = torch.stack([self.sums[name] for name in names])
        if self.run.world_size > 1:
            dist.all_reduce(totals)  # loss shares add up over processes; the norm is the same on each
            totals[names.index("grad_norm")] /= self.run.world_size
        means = dict(zip(names, (totals / self.steps).tolist()))
        if not math.isfinite(means["loss"]):  # stop before anything more is saved: the last checkpoint is good
            checkpoint = Path(self.run.config["out_dir"]) / CHECKPOINT
            raise InputError(f"the loss is {means['loss']} at step {progress['step']} (epoch {progress['epoch'] + 1}); "
                             f"stopped. The last good state is {checkpoint if checkpoint.exists() else 'not saved'}; "
                             f"try a lower --lr")
        now = time.time()
        line = {"step": progress["step"], "epoch": round(epoch, 4), "loss": means.pop("loss"), "lr": lr, **means,
                "tokens_per_second": (progress["real_tokens"] - self.tokens) / max(now - self.time, 1e-9),
                "elapsed": progress["train_seconds"] + now - t0}
        self.since_evaluation[0] += line["loss"] * self.steps
        self.since_evaluation[1] += self.steps
        self.sums, self.steps, self.tokens, self.time = {}, 0, progress["real_tokens"], now
        self.append(line)
        return line

    def evaluation(self, progress, epoch, summary):
        """Log the dev metrics; returns the mean training loss since the last evaluation (by default: the epoch's)."""
        self.append({"step": progress["step"], "epoch": epoch, "elapsed": progress["train_seconds"],
                     "dev": {k: v for k, v in summary.items() if isinstance(v, (int, float))}})
        total, steps = self.since_evaluation
        self.since_evaluation, self.time = [0.0, 0], time.time()  # scoring time is not training time
        return total / steps if steps else None

    def append(self, line):
        if not self.run.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.echo:
            print(json.dumps(line), flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in line.items() if k != "dev"} | line.get("dev", {}), step=line["step"])


def read_log(path):
    """The lines of a log.jsonl, as dicts (none if there is no file). A last line cut short by a killed run is
    dropped; any other line that is not JSON is an InputError naming it."""
    path = Path(path)
    text = read_text(path) if path.exists() else ""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            if number == len(text.splitlines()) and not text.endswith("\n"):
                break  # the last write of a killed run
            raise InputError(f"{path}:{number}: not a line of JSON: {line[:60]!r}") from None
    return lines

