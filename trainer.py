"""
The training loop, written once for every objective (after nanoGPT's train.py and minGPT's trainer).

    run = trainer.start(trainer.check_config(config))       # settings checked, out_dir locked, torchrun joined
    model = trainer.load_policy(run.config).to(run.device)    # GPT-2, with LoRA adapters if --lora_r
    results = trainer.fit(run, model, sizes, loss_fn, evaluate, regime="sft", title="...")

fit knows nothing of SFT, DPO or ORPO: the objective is loss_fn(model, micro_batch, batch) -> (loss, figures),
on lists of item indices. `batch` is one optimizer step's items (over every process), `micro_batch` this call's;
the loss is micro_batch's share of the mean over batch, so the shares' gradients add up to the batch mean's
however it is split. `figures` are more such shares for log.jsonl, or {}. `evaluate(model)` returns the dev
metrics: "score" (what results.json reports) and "selection" (what best/ is chosen by).
"""

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CHECKPOINT, check_source, finished_results, load_model, print_results, reset_peak_memory,
                        run_results, save_checkpoint, save_model, start_or_resume)
from data.batching import batch_indices
from fileio import InputError, lock_dir, writable_dir, write_json
from flags import (LIMIT, NON_NEGATIVE, POSITIVE, REQUIRED, at_least, between, check, check_device, default_device,
                   one_of)
from lora import DEFAULT_TARGETS, apply_lora, load_lora
from runlog import Log

# -----------------------------------------------------------------------------
# settings: name -> (default, type, valid values, why). Every one is a command-line flag: --name value.

SETTINGS = {
    "task": (REQUIRED, str, one_of("paraphrase", "sonnet"), "paraphrase or sonnet"),
    "init_from": ("gpt2", str, None, "a GPT-2 name (gpt2 ... gpt2-xl), a model folder or a run's out_dir (its last/)"),
    "data_dir": ("data", str, None, "where the course's files are (python -m data.download puts them there)"),
    "out_dir": (None, str, None, "where this run writes; default out/{sft|dpo}-{task}-{fft|lora}"),
    "epochs": (10, int, at_least(1), "the course's starter trains 10 epochs"),
    "batch_size": (8, int, at_least(1), "examples per optimizer step, the course's 8 (split over --grad_accum, GPUs)"),
    "grad_accum": (1, int, at_least(1), "split each batch into this many micro-batches: same update, less memory"),
    "lr": (None, float, POSITIVE, "peak learning rate; default 1e-5 for FFT (the course's), 2e-4 for LoRA (Hu et al. "
                                  "2021's GPT-2 setting: at 1e-5 a LoRA run barely moves)"),
    "warmup": (0.05, float, between(0, 1), "share of the steps warming the learning rate up from 0, at least one if "
                                           "above 0 (AdamW's first moment estimates are noise)"),
    "min_lr_ratio": (0.1, float, between(0, 1), "cosine decay ends at lr * this (nanoGPT's and Chinchilla's 10x)"),
    "weight_decay": (0.0, float, NON_NEGATIVE, "AdamW's decay, on 2-D weight matrices only; the course's is 0"),
    "grad_clip": (1.0, float, NON_NEGATIVE, "clip the grad norm to this (0 = off): one bad batch can't wreck a run"),
    "dropout": (0.1, float, between(0, 0.999), "GPT-2's own (and the course's) dropout"),
    "lora_r": (0, int, (lambda v: v >= 0, "must be 0 (full fine-tuning) or a rank such as 8"), "LoRA rank; 0 = FFT"),
    "lora_alpha": (16.0, float, POSITIVE, "LoRA's alpha: the update is (alpha / r) B A (alpha = 2r is common)"),
    "lora_dropout": (0.0, float, between(0, 0.999), "dropout on LoRA's input"),
    "lora_targets": (",".join(DEFAULT_TARGETS), str, (lambda v: v.strip(", "), "name at least one Linear layer"),
                     "comma-separated Linear layers LoRA adapts"),
    "lora_rslora": (False, bool, None, "rsLoRA (Kalajdzievski 2023): scale by alpha / sqrt(r), not alpha / r, so a "
                                       "larger rank does not learn slower"),
    "lora_plus_ratio": (1.0, float, POSITIVE, "LoRA+ (Hayou et al. 2024): B's learning rate is this times A's; 1 = "
                                              "plain LoRA, the paper suggests about 16"),
    "lora_init": (None, str, (lambda v: Path(v).is_file(), "no such file (a run's lora_init.safetensors)"),
                  "start LoRA's A and B from this file: a run's lora_init.safetensors repeats it"),
    "seed": (11711, int, None, "the course's seed"),
    "device": (default_device(), str, None, "cuda, cuda:N, mps or cpu (default: the best one here)"),
    "dtype": ("auto", str, one_of("auto", "float32", "bfloat16"), "auto: bfloat16 autocast on a GPU that has it"),
    "compile": (False, bool, None, "torch.compile the model (worth it on a GPU for long runs)"),
    "logprobs": ("auto", str, one_of("auto", "plain", "chunked"), "plain (log_softmax, gather), chunked (never a "
                 "batch's logits: chunked_logprobs.py), auto: chunked only when the logits would be large"),
    "train_limit": (None, int, LIMIT, "train on the first N examples only"),
    "dev_limit": (None, int, LIMIT, "evaluate on the first N dev examples only (paraphrase)"),
    "eval_every": (0, int, at_least(-1), "score on dev every N steps and at the end; 0 = each epoch's end (the "
                                         "course's); -1 = only at the end"),
    "eval_batch_size": (64, int, at_least(1), "examples per batch when scoring the dev set"),
    "temperature": (1.2, float, NON_NEGATIVE, "sonnet generation when scoring: the course's"),
    "top_p": (0.9, float, between(1e-9, 1), "sonnet generation when scoring: the course's"),
    "max_new_tokens": (128, int, at_least(1), "sonnet generation when scoring: the course's"),
    "resume": (False, bool, None, "continue from out_dir/checkpoint.pt (starts afresh, and says so, if none)"),
    "checkpoint_every": (0, int, NON_NEGATIVE, "also save checkpoint.pt every N steps (0: only when dev is scored)"),
    "log_every": (10, int, at_least(1), "a log.jsonl line every N steps; each reads the loss back from the GPU, "
                                        "where a NaN is caught (always before a save)"),
    "save_best": (True, bool, None, "also keep best/, the best dev score's model (the course's); last/ is kept"),
    "keep_checkpoints": (False, bool, None, "keep checkpoint.pt after the run (it holds AdamW's state: 3x the model)"),
    "wandb_project": (None, str, None, "send log.jsonl's lines to this Weights & Biases project (pip install wandb)"),
}


def check_config(config, settings=SETTINGS, prefix="sft"):
    """flags.check, the checks that span several settings, and the derived defaults: nothing is loaded."""
    config = check(config, settings)
    if config["lr"] is None:
        config["lr"] = 2e-4 if config["lora_r"] else 1e-5
    if config["grad_accum"] > config["batch_size"]:
        raise InputError(f"--grad_accum {config['grad_accum']}: cannot split a batch of {config['batch_size']} into "
                         f"more micro-batches than examples")
    lora_only = [f"--{k}" + ("" if config[k] is True else f" {config[k]}")
                 for k in ("lora_plus_ratio", "lora_rslora", "lora_init") if config[k] != settings[k][0]]
    if not config["lora_r"] and lora_only:
        raise InputError(f"{lora_only[0]}: needs --lora_r (full fine-tuning has no LoRA A and B)")
    check_device(config["device"])
    check_source(config["init_from"], "--init_from")
    if config["out_dir"] is None:
        config["out_dir"] = f"out/{prefix}-{config['task']}-{'lora' if config['lora_r'] else 'fft'}"
    writable_dir(config["out_dir"], "--out_dir")
    return config


# -----------------------------------------------------------------------------
# the run: this process's settings, its place among torchrun's processes, and its hold on out_dir


@dataclass
class Run:
    config: dict
    rank: int = 0  # this process, under torchrun
    world_size: int = 1  # how many processes share each batch
    held: ExitStack = field(default_factory=ExitStack)  # the lock on out_dir, released when the run ends

    def __post_init__(self):
        self.device = self.config["device"]
        self.device_type = self.device.split(":")[0]
        self.master = self.rank == 0  # only one process prints and writes


def start(config):
    """Lock out_dir for this process (a second run on it stops here, at once), join torchrun's processes (RANK
    in the environment: one per device), seed every generator and start counting peak memory."""
    rank, world_size = 0, 1
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if config["batch_size"] % world_size:
            raise InputError(f"--batch_size {config['batch_size']}: must be a multiple of the {world_size} processes")
        if config["device"].startswith("cuda"):
            config["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(config["device"])
        dist.init_process_group(backend="nccl" if config["device"].startswith("cuda") else "gloo")
    run = Run(config, rank, world_size)
    if run.master:
        run.held.enter_context(lock_dir(config["out_dir"]))
    reset_peak_memory(run.device_type)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    return run


def load_policy(config):
    """init_from, with LoRA adapters when --lora_r is set (the rest frozen): fresh or --lora_init's (drawn all the
    same, so every later random number is too). A LoRA SFT run loads with its adapter folded in."""
    model = load_model(config["init_from"], dropout=config["dropout"])
    if config["lora_r"]:
        try:
            apply_lora(model, r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
                       targets=[t.strip() for t in config["lora_targets"].split(",") if t.strip()],
                       rslora=config["lora_rslora"])
        except ValueError as e:
            raise InputError(f"--lora_targets {config['lora_targets']}: {e}") from None
        if config["lora_init"] is not None:
            load_lora(model, config["lora_init"])  # onto the layers just made: an adapter that does not fit is refused
    return model


def describe(config):
    if not config["lora_r"]:
        return "full fine-tuning"
    return (f"{'rsLoRA' if config['lora_rslora'] else 'LoRA'} r={config['lora_r']}"
            + (f", LoRA+ ratio {config['lora_plus_ratio']:g}" if config["lora_plus_ratio"] != 1 else ""))


# -----------------------------------------------------------------------------
# the loop


def fit(run, model, sizes, loss_fn, evaluate, regime, title, extra=None):
    """Train `model` (on run.device) on items of `sizes` tokens with `loss_fn`; returns results.json's dict
    (with `extra`'s keys added)."""
    with run.held:
        if (done := finished_results(run)) is not None:
            return done
        progress = train_loop(run, model, sizes, loss_fn, evaluate, title)
        results = {**run_results(run, regime, model, progress), **(extra or {})} if run.master else None
        if run.master:
            print_results(results)
            write_json(Path(run.config["out_dir"]) / "results.json", results)
            if not run.config["keep_checkpoints"]:
                (Path(run.config["out_dir"]) / CHECKPOINT).unlink(missing_ok=True)  # it only resumes a broken run
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def train_loop(run, model, sizes, loss_fn, evaluate, title):
    config, device, out_dir = run.config, run.device, Path(run.config["out_dir"])
    optimizer = configure_optimizer(model, config["lr"], config["weight_decay"], run.device_type,
                                    config["lora_plus_ratio"])
    progress = start_or_resume(run, model, optimizer)
    ddp_model = wrap_model(model, config, run.world_size)  # compiled and/or DDP; the same weights as model
    autocast = autocast_context(config, run.device_type)
    steps_per_epoch = len(epoch_batches(sizes, config, 0, run.world_size))
    total_steps = config["epochs"] * steps_per_epoch
    log = Log(run, progress)
    if run.master:
        print(f"{title} on {device}: {model.num_parameters(trainable_only=True):,} of {model.num_parameters():,} "
              f"parameters train; {len(sizes)} examples, {total_steps} steps")
    stop = StopSignal(run.master)
    t0 = time.time()
    while progress["step"] < total_steps:
        batches = epoch_batches(sizes, config, progress["epoch"], run.world_size)
        ddp_model.train()
        bar = tqdm(total=len(batches), initial=progress["batch"], disable=not run.master or None,
                   desc=f"epoch {progress['epoch'] + 1}/{config['epochs']}")
        for batch in batches[progress["batch"]:]:
            lr = lr_at(progress["step"], total_steps, config["lr"], config["warmup"], config["min_lr_ratio"])
            for group in optimizer.param_groups:  # LoRA+'s B group keeps its ratio to the rest
                group["lr"] = lr * group["lr_scale"]
            mine = batch[run.rank::run.world_size]  # this process's share, in --grad_accum micro-batches
            size = math.ceil(len(mine) / config["grad_accum"])
            parts = [mine[i:i + size] for i in range(0, len(mine), size)]
            for k, part in enumerate(parts):
                # DDP averages gradients over processes once per batch, on its last micro-batch
                sync = ddp_model.no_sync() if run.world_size > 1 and k < len(parts) - 1 else nullcontext()
                with sync, autocast:
                    loss, figures = loss_fn(ddp_model, part, batch)
                (loss * run.world_size).backward()  # DDP averages over processes; the shares must add up
                log.add(loss=loss, **figures)  # stays on the device: no wait for the GPU here
            trainable = [p for p in model.parameters() if p.requires_grad]
            log.add(grad_norm=torch.nn.utils.clip_grad_norm_(trainable, config["grad_clip"] or math.inf))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            progress["batch"] += 1
            progress["real_tokens"] += sum(sizes[i] for i in batch)
            bar.update()
            epoch = progress["epoch"] + progress["batch"] / len(batches)
            log_now = progress["step"] % config["log_every"] == 0
            stopping = stop.requested(run, log_now)
            save_now = stopping or config["checkpoint_every"] and progress["step"] % config["checkpoint_every"] == 0
            every = config["eval_every"]  # N: every N steps; 0: at each epoch's end; -1: only at the end
            evaluate_now = (progress["step"] == total_steps or every > 0 and progress["step"] % every == 0
                            or every == 0 and progress["step"] % steps_per_epoch == 0)
            if log_now or save_now or evaluate_now or progress["batch"] == len(batches):
                # the step's only wait for the device (with torchrun's all-reduce): elsewhere the host runs ahead
                line = log.write(progress, epoch, lr, t0)
                bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{lr:.2e}")
            if progress["batch"] == len(batches):  # a checkpoint saved from here on starts the next epoch
                progress["epoch"] += 1
                progress["batch"] = 0
            if evaluate_now or save_now:
                progress["train_seconds"] += time.time() - t0
                if evaluate_now:
                    evaluate_and_save(run, model, optimizer, evaluate, progress, log, epoch)
                elif run.master:
                    save_checkpoint(out_dir / CHECKPOINT, model, optimizer, progress)
                t0 = time.time()
                ddp_model.train()
            if stopping:
                stop.exit(run, progress)
        bar.close()
    stop.restore()
    return progress


def evaluate_and_save(run, model, optimizer, evaluate, progress, log, epoch):
    """Score on dev, keep last/ (and best/ when it improved), save a resumable state."""
    config, out_dir, t0 = run.config, Path(run.config["out_dir"]), time.time()
    if run.master:
        metrics = evaluate(model)
        save_model(model, out_dir / "last", config)
        lists = {k: v for k, v in metrics.items() if isinstance(v, list)}  # per-example predictions
        summary = {k: v for k, v in metrics.items() if k not in lists}
        write_json(out_dir / "dev_predictions.json", lists)
        best = max((h["selection"] for h in progress["history"]), default=None)
        improved = best is None or summary["selection"] > best
        if improved and config["save_best"]:
            save_model(model, out_dir / "best", config)
            write_json(out_dir / "best_dev_predictions.json", lists)
        epoch = int(epoch) if epoch == int(epoch) else round(epoch, 4)
        train_loss = log.evaluation(progress, epoch, summary)
        progress["history"].append({"epoch": epoch, "step": progress["step"], "train_loss": train_loss, **summary})
        print(f"epoch {epoch:g}, step {progress['step']}: "
              + "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k not in ("score", "selection"))
              + ("  (best so far)" if improved else ""))
        progress["eval_seconds"] += time.time() - t0
        save_checkpoint(out_dir / CHECKPOINT, model, optimizer, progress)
    if run.world_size > 1:
        dist.barrier()


class StopSignal:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) end a run cleanly: the current step finishes, a
    checkpoint is written (fit's loop does that), one line says how to continue, and the process exits with
    128 + the signal's number. A second Ctrl-C exits at once."""

    def __init__(self, master):
        self.signum, self.saved = None, {}
        if master and threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, run, log_step):
        """Whether any process was asked to stop (under torchrun all stop at the same step, a --log_every one)."""
        if run.world_size > 1:
            if not log_step:
                return False
            flag = torch.tensor([float(self.signum or 0)], device=run.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None

    def exit(self, run, progress):
        self.restore()
        if run.master:
            print(f"stopped by {signal.Signals(self.signum).name} at step {progress['step']}; checkpoint saved in "
                  f"{run.config['out_dir']}; run the same command with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + self.signum)

    def restore(self):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.saved = {}


# -----------------------------------------------------------------------------
# the loop's parts: optimizer, schedule, batches, precision, devices


def configure_optimizer(model, lr, weight_decay, device_type, lora_plus_ratio=1.0):
    """AdamW over the trainable parameters only, decaying 2-D weight matrices (not biases, LayerNorms, LoRA's A, B).
    LoRA+ (Hayou et al. 2024): with lora_plus_ratio lambda != 1, B gets its own group at lambda * lr (B starts at 0
    and, in wide layers, learns efficiently only with a larger step than A). A group's "lr_scale" is its multiple
    of the schedule's learning rate."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {n for n, p in params if p.dim() >= 2 and not n.endswith((".lora_A", ".lora_B"))}
    own_b = {n for n, _ in params if n.endswith(".lora_B")} if lora_plus_ratio != 1 else set()
    groups = [{"params": [p for n, p in params if n in decayed], "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": [p for n, p in params if n not in decayed | own_b], "weight_decay": 0.0, "lr_scale": 1.0}]
    if own_b:
        groups.append({"params": [p for n, p in params if n in own_b], "weight_decay": 0.0,
                       "lr": lr * lora_plus_ratio, "lr_scale": lora_plus_ratio})
    fused = device_type in ("cuda", "cpu")  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def lr_at(step, total_steps, lr, warmup=0.05, min_lr_ratio=0.1):
    """With W = ceil(warmup * total_steps) warm-up steps (at least 1 when warmup > 0) and m = min_lr_ratio:

        lr(s) = lr * (s + 1) / W                                                     for s < W
        lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - W) / (total_steps - W))) / 2)  after"""
    warmup_steps = math.ceil(warmup * total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def epoch_batches(sizes, config, epoch, world_size=1):
    """This epoch's batches (lists of item indices): shuffled by (seed, epoch), similar sizes together. The seed
    is seed * 2**32 + epoch: with seed + epoch, seed 11711's epoch 1 would be seed 11712's epoch 0. With several
    processes, a batch must hold at least one item per process; a smaller last one is dropped."""
    batches = batch_indices(sizes, config["batch_size"], shuffle=True, seed=config["seed"] * 2**32 + epoch)
    return [b for b in batches if len(b) >= world_size]


def autocast_context(config, device_type):
    """bfloat16 autocast (matmuls in bfloat16, softmax and the loss in float32) if --dtype says so; auto: on a GPU
    that has bfloat16 (half the memory traffic, float32's range)."""
    auto = device_type == "cuda" and torch.cuda.is_bf16_supported()
    if config["dtype"] == "bfloat16" or config["dtype"] == "auto" and auto:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def wrap_model(model, config, world_size):
    if config["compile"]:
        model = torch.compile(model)
    if world_size > 1:
        device = config["device"]
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    return model
