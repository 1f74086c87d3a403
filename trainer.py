"""
The training loop, written once for every objective (after nanoGPT's train.py and minGPT's trainer).

    run = trainer.start(trainer.check_config(config))      # settings checked, torchrun joined
    model = trainer.load_policy(run.config).to(run.device)   # GPT-2, with fresh LoRA adapters if --lora_r
    results = trainer.fit(run, model, lengths, loss_fn, evaluate, regime="sft", title="...")

fit knows nothing of SFT or DPO. The objective comes in as a function:

    loss_fn(model, part, batch) -> loss

`batch` holds the indices of the items of one optimizer step (over every process), `part` those of this
micro-batch; the loss is part's share of the mean over batch, so the micro-batches' gradients add up to the
gradient of the whole batch's mean loss, however the batch is split (train_sft.py and train_dpo.py each define
one). `evaluate(model)` returns the dev metrics: "score" (what results.json and the study report) and
"selection" (what best/ is chosen by).

What the loop does: AdamW, linear warm-up then cosine decay, gradient clipping, bfloat16 autocast, gradient
accumulation, DistributedDataParallel under torchrun, a stop on a NaN loss, checkpoint.pt and --resume (exact,
down to the random number generators), and at each epoch end the dev score, last/ and best/ (checkpoint.py
writes and reads them) and, when the run ends, results.json.
"""

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CHECKPOINT, check_source, load_checkpoint, load_model, save_checkpoint, save_model
from data.batching import batch_indices
from fileio import InputError, read_text, writable_dir, write_json
from lora import DEFAULT_TARGETS, apply_lora
from model import check_device, default_device

# -----------------------------------------------------------------------------
# settings: name -> (default, type, valid values, why). Every one is a command-line flag: --name value.


def at_least(low):
    return lambda v: v >= low, f"must be at least {low}"


def between(low, high):
    return lambda v: low <= v <= high, f"must be between {low} and {high}"


def one_of(*choices):
    return lambda v: v in choices, f"must be {', '.join(choices[:-1])} or {choices[-1]}"


POSITIVE = (lambda v: v > 0 and math.isfinite(v), "must be a positive number")
NON_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
LIMIT = (lambda v: v is None or v >= 1, "must be at least 1 (leave it out to use every example)")
ANY = None

SETTINGS = {
    "task": (None, str, one_of("paraphrase", "sonnet"), "paraphrase or sonnet (required)"),
    "init_from": ("gpt2", str, ANY, "a GPT-2 name (gpt2 ... gpt2-xl), a model directory, or an earlier run's out_dir"),
    "data_dir": ("data", str, ANY, "where the course's files are (python -m data.download puts them there)"),
    "out_dir": (None, str, ANY, "where this run writes; default out/{sft|dpo}-{task}-{fft|lora}"),
    "epochs": (10, int, at_least(1), "the course's starter trains 10 epochs"),
    "batch_size": (8, int, at_least(1), "examples per optimizer step, the course's 8 (split over --grad_accum and GPUs)"),
    "grad_accum": (1, int, at_least(1), "split each batch into this many micro-batches: same update, less memory"),
    "lr": (None, float, POSITIVE, "peak learning rate such as 1e-5; default 1e-5 for FFT (the course's) and 2e-4 "
                                  "for LoRA (Hu et al. 2021's GPT-2 setting: at 1e-5 a LoRA run barely moves)"),
    "warmup": (0.05, float, between(0, 1), "fraction of the steps spent warming the learning rate up from 0 "
                                           "(stabilises AdamW's first steps, whose moment estimates are still noise)"),
    "min_lr_ratio": (0.1, float, between(0, 1), "cosine decay ends at lr * this (nanoGPT's and Chinchilla's 10x)"),
    "weight_decay": (0.0, float, NON_NEGATIVE, "AdamW's decay, on 2-D weight matrices only; the course's starter uses 0"),
    "grad_clip": (1.0, float, NON_NEGATIVE, "clip the global gradient norm to this (0 = off): one bad batch can't "
                                            "wreck a run"),
    "dropout": (0.1, float, between(0, 0.999), "GPT-2's own (and the course's) dropout"),
    "lora_r": (0, int, (lambda v: v >= 0, "must be 0 (full fine-tuning) or a positive rank such as 8"),
               "LoRA rank; 0 = full fine-tuning"),
    "lora_alpha": (16.0, float, ANY, "LoRA scale alpha: the update is (alpha / r) B A (alpha = 2r, a common choice)"),
    "lora_dropout": (0.0, float, between(0, 0.999), "dropout on LoRA's input"),
    "lora_targets": (",".join(DEFAULT_TARGETS), str, ANY, "comma-separated Linear layers LoRA adapts (all of a block's)"),
    "lora_rslora": (False, bool, ANY, "rsLoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of "
                                      "alpha / r, so that a larger rank does not learn slower"),
    "lora_plus_ratio": (1.0, float, POSITIVE, "LoRA+ (Hayou et al. 2024): B's learning rate is this times A's (--lr); "
                                              "1 = plain LoRA, the paper suggests about 16"),
    "seed": (11711, int, ANY, "the course's seed"),
    "device": (default_device(), str, ANY, "cuda, cuda:N, mps or cpu (the default is the best one here)"),
    "dtype": ("auto", str, one_of("auto", "float32", "bfloat16"),
              "auto (bfloat16 autocast on a GPU that has it, else float32), float32 or bfloat16"),
    "compile": (False, bool, ANY, "torch.compile the model (worth it on a GPU for long runs)"),
    "train_limit": (None, int, LIMIT, "train on the first N examples only"),
    "dev_limit": (None, int, LIMIT, "evaluate on the first N dev examples only (paraphrase)"),
    "eval_batch_size": (64, int, at_least(1), "examples per batch when scoring the dev set"),
    "temperature": (1.2, float, NON_NEGATIVE, "sonnet generation when scoring: the course's"),
    "top_p": (0.9, float, between(1e-9, 1), "sonnet generation when scoring: the course's"),
    "max_new_tokens": (128, int, at_least(1), "sonnet generation when scoring: the course's"),
    "resume": (False, bool, ANY, "continue from out_dir/checkpoint.pt (starts afresh, and says so, if there is none)"),
    "checkpoint_every": (0, int, (lambda v: v >= 0, "must be 0 (epoch ends only) or a positive number of steps"),
                         "also save a resumable state every N optimizer steps (0: at epoch ends only)"),
    "log_every": (10, int, at_least(1), "read the loss back from the device every N steps (each read waits for "
                                        "the GPU; a NaN is caught at the next read, always before a save)"),
    "save_best": (True, bool, ANY, "also keep best/, the best dev epoch's model (the course's practice); "
                                   "last/ is always kept"),
    "keep_checkpoints": (False, bool, ANY, "keep checkpoint.pt when the run has finished (it exists to resume "
                                           "an interrupted run, and holds AdamW's state: 3x the model)"),
}

# settings a resumed run may change: they do not change what is trained
RESUMABLE_CHANGES = ("resume", "checkpoint_every", "device", "out_dir", "data_dir", "cache_dir", "eval_batch_size",
                     "compile", "grad_accum", "live_reference", "log_every", "save_best", "keep_checkpoints")


def defaults(settings=SETTINGS):
    return {name: row[0] for name, row in settings.items()}


def parse_bool(value):
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv, settings=SETTINGS, description=__doc__):
    parser = argparse.ArgumentParser(description=description.strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, (default, kind, _, why) in settings.items():
        if kind is bool:  # --resume, or --resume true / false
            parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=default, help=why)
        else:
            parser.add_argument(f"--{name}", type=kind, default=default, help=why, required=name == "task")
    return vars(parser.parse_args(argv))


def check_config(config, settings=SETTINGS, prefix="sft"):
    """Every setting that can be checked without loading anything (each row's valid values, then the checks
    that span several settings); fills in the derived defaults."""
    config = {**defaults(settings), **config}
    if config["lr"] is None:
        config["lr"] = 2e-4 if config["lora_r"] else 1e-5
    for name, (_, _, valid, _) in settings.items():
        if valid is not None and config[name] is not None and not valid[0](config[name]):
            raise InputError(f"--{name} {config[name]}: {valid[1]}")
    if config["grad_accum"] > config["batch_size"]:
        raise InputError(f"--grad_accum {config['grad_accum']}: cannot split a batch of {config['batch_size']} into "
                         f"more micro-batches than examples")
    if config["lora_r"] and not config["lora_alpha"] > 0:
        raise InputError(f"--lora_alpha {config['lora_alpha']}: must be positive")
    if not config["lora_r"] and (config["lora_rslora"] or config["lora_plus_ratio"] != 1):
        flag = f"--lora_plus_ratio {config['lora_plus_ratio']}" if config["lora_plus_ratio"] != 1 else "--lora_rslora"
        raise InputError(f"{flag}: needs --lora_r (full fine-tuning has no LoRA A and B)")
    if not lora_targets(config):
        raise InputError(f"--lora_targets {config['lora_targets']}: name at least one Linear layer, "
                         f"e.g. {','.join(DEFAULT_TARGETS)}")
    check_device(config["device"])
    check_source(config["init_from"], "--init_from")
    if config["out_dir"] is None:
        config["out_dir"] = f"out/{prefix}-{config['task']}-{'lora' if config['lora_r'] else 'fft'}"
    writable_dir(config["out_dir"], "--out_dir")
    return config


def lora_targets(config):
    return [t.strip() for t in config["lora_targets"].split(",") if t.strip()]


# -----------------------------------------------------------------------------
# the run: this process's settings and its place among torchrun's processes


@dataclass
class Run:
    config: dict
    rank: int = 0  # this process, under torchrun
    world_size: int = 1  # how many processes share each batch

    @property
    def device(self):
        return self.config["device"]

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def master(self):  # only one process prints and writes
        return self.rank == 0


def start(config):
    """For a checked config: join torchrun's processes (RANK in the environment: one process per device,
    gradients averaged by DDP), seed every generator and start counting peak memory."""
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
    reset_peak_memory(run.device_type)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    return run


def load_policy(config):
    """The model to train: init_from, with fresh LoRA adapters when --lora_r is set (GPT-2 then frozen).

    An SFT run's LoRA folder loads as its base model with the SFT adapter folded in, so SFT->DPO with LoRA
    trains a new adapter on top of the SFT model."""
    model = load_model(config["init_from"], dropout=config["dropout"])
    if config["lora_r"]:
        try:
            apply_lora(model, r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
                       targets=lora_targets(config), rslora=config["lora_rslora"])
        except ValueError as e:
            raise InputError(f"--lora_targets {config['lora_targets']}: {e}") from None
    return model


def describe(config):
    if not config["lora_r"]:
        return "full fine-tuning"
    return (f"{'rsLoRA' if config['lora_rslora'] else 'LoRA'} r={config['lora_r']}"
            + (f", LoRA+ ratio {config['lora_plus_ratio']:g}" if config["lora_plus_ratio"] != 1 else ""))


# -----------------------------------------------------------------------------
# the loop


def fit(run, model, lengths, loss_fn, evaluate, regime, title, extra=None):
    """Train `model` (on run.device) on items of `lengths` tokens with `loss_fn`; returns results.json's dict
    (with `extra`'s keys added)."""
    config, device, out_dir = run.config, run.device, Path(run.config["out_dir"])
    if (done := finished_results(run)) is not None:
        return done
    optimizer = configure_optimizer(model, config["lr"], config["weight_decay"], run.device_type,
                                    config["lora_plus_ratio"])
    progress = start_or_resume(run, model, optimizer)
    ddp_model = wrap_model(model, config, run.world_size)  # compiled and/or DDP; the same weights as model
    autocast = autocast_context(config, run.device_type)
    total_steps = config["epochs"] * len(epoch_batches(lengths, config, 0, run.world_size))
    if run.master:
        print(f"{title} on {device}: {model.num_parameters(trainable_only=True):,} of {model.num_parameters():,} "
              f"parameters train; {len(lengths)} examples, {total_steps} steps")

    while progress["epoch"] < config["epochs"]:
        batches = epoch_batches(lengths, config, progress["epoch"], run.world_size)
        ddp_model.train()
        bar = tqdm(total=len(batches), initial=progress["batch"], disable=not run.master or None,
                   desc=f"epoch {progress['epoch'] + 1}/{config['epochs']}")
        t0, unread, unread_steps = time.time(), torch.zeros((), device=device), 0
        while progress["batch"] < len(batches):
            batch = batches[progress["batch"]]
            lr = lr_at(progress["step"], total_steps, config["lr"], config["warmup"], config["min_lr_ratio"])
            for group in optimizer.param_groups:  # LoRA+'s B group keeps its ratio to the rest
                group["lr"] = lr * group.get("lr_scale", 1.0)  # (checkpoints written before LoRA+ have none)
            parts = micro_batches(batch[run.rank::run.world_size], config["grad_accum"])  # this process's share
            for k, part in enumerate(parts):
                # DDP averages gradients over processes once per batch, on its last micro-batch
                sync = ddp_model.no_sync() if run.world_size > 1 and k < len(parts) - 1 else nullcontext()
                with sync, autocast:
                    loss = loss_fn(ddp_model, part, batch)
                (loss * run.world_size).backward()  # DDP averages over processes; the shares must add up
                unread += loss.detach().float()  # stays on the device: no wait for the GPU here
            if config["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress["step"] += 1
            progress["batch"] += 1
            progress["real_tokens"] += sum(lengths[i] for i in batch)
            unread_steps += 1
            bar.update()
            save_now = (config["checkpoint_every"] and progress["step"] % config["checkpoint_every"] == 0
                        and progress["batch"] < len(batches))
            if save_now or progress["step"] % config["log_every"] == 0 or progress["batch"] == len(batches):
                # The step's only waits for the device: this read of the loss (every --log_every steps, before a
                # save and at an epoch's end) and, under torchrun, its all-reduce. Elsewhere the host runs ahead:
                # batches are cut on the CPU (target_window) and copied over, token ids are checked there
                # (collate), the loss accumulates on the device, and clipping and fused AdamW never read a value.
                train_loss = read_loss(run, unread, unread_steps, progress, out_dir)
                unread, unread_steps = torch.zeros((), device=device), 0
                elapsed = progress["train_seconds"] + time.time() - t0
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{progress['real_tokens'] / elapsed:.0f}")
            if save_now:
                progress["train_seconds"] += time.time() - t0
                t0 = time.time()
                if run.master:
                    save_checkpoint(out_dir / CHECKPOINT, model, optimizer, progress)
        bar.close()
        progress["train_seconds"] += time.time() - t0
        end_of_epoch(run, model, optimizer, evaluate, progress, train_loss)

    results = {**run_results(run, regime, model, progress), **(extra or {})} if run.master else None
    if run.master:
        print_results(results)
        write_json(out_dir / "results.json", results)
        if not config["keep_checkpoints"]:
            (out_dir / CHECKPOINT).unlink(missing_ok=True)  # it exists only to resume an unfinished run
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def read_loss(run, unread, steps, progress, out_dir):
    """The mean loss of the steps since the last read (summed over processes); a NaN/inf stops the run before
    anything more is saved, so the last checkpoint is still a good one."""
    if run.world_size > 1:
        dist.all_reduce(unread)
    loss = unread.item() / steps
    if not math.isfinite(loss):
        checkpoint = out_dir / CHECKPOINT
        raise InputError(f"the loss is {loss} at step {progress['step']} (epoch {progress['epoch'] + 1}); stopped. "
                         f"The last good state is {checkpoint if checkpoint.exists() else 'not saved'}; try a lower --lr")
    return loss


def end_of_epoch(run, model, optimizer, evaluate, progress, train_loss):
    """Score on dev, keep last/ (and best/ when it improved), save a resumable state."""
    config, out_dir, t0 = run.config, Path(run.config["out_dir"]), time.time()
    if run.master:
        metrics = evaluate(model)
        save_model(model, out_dir / "last", config)
        lists = {k: v for k, v in metrics.items() if isinstance(v, list)}  # per-example predictions
        summary = {k: v for k, v in metrics.items() if k not in lists}
        write_json(out_dir / "dev_predictions.json", lists)
        best = max((h.get("selection", h["score"]) for h in progress["history"]), default=None)
        improved = best is None or summary["selection"] > best
        if improved and config["save_best"]:
            save_model(model, out_dir / "best", config)
            write_json(out_dir / "best_dev_predictions.json", lists)
        progress["history"].append({"epoch": progress["epoch"] + 1, "train_loss": train_loss, **summary})
        print(f"epoch {progress['epoch'] + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()
                                                           if k not in ("score", "selection"))
              + ("  (best so far)" if improved else ""))
    progress["eval_seconds"] += time.time() - t0
    progress["epoch"] += 1
    progress["batch"] = 0
    if run.master:
        save_checkpoint(out_dir / CHECKPOINT, model, optimizer, progress)
    if run.world_size > 1:
        dist.barrier()


def start_or_resume(run, model, optimizer):
    """A fresh progress record, or with --resume the one in checkpoint.pt (refused if it was written with
    other settings)."""
    config, checkpoint = run.config, Path(run.config["out_dir"]) / CHECKPOINT
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "train_seconds": 0.0, "eval_seconds": 0.0,
                "real_tokens": 0, "config": trained_with(config)}
    if config["resume"]:
        if checkpoint.exists():
            progress = load_checkpoint(checkpoint, model, optimizer)
            check_same_settings(checkpoint, progress.get("config", {}), config)
            if run.master:
                print(f"resuming from {checkpoint}: epoch {progress['epoch'] + 1}, step {progress['step']}")
        elif run.master:
            print(f"--resume: no {checkpoint} yet, so starting from the beginning")
    return progress


def finished_results(run):
    """With --resume, the results of a run that has already finished (its checkpoint.pt is gone): it is not
    trained again, and one trained with other settings is refused rather than overwritten."""
    config, path = run.config, Path(run.config["out_dir"]) / "results.json"
    if not (config["resume"] and path.exists() and not (path.parent / CHECKPOINT).exists()):
        return None
    results = json.loads(read_text(path))
    check_same_settings(path, results.get("config", {}), config)
    if run.master:
        print(f"--resume: {path} says this run has finished; not training it again")
    return results


def trained_with(config):
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def check_same_settings(path, saved, config):
    """Settings that change what is trained must be what `path` was written with."""
    now = trained_with(config)
    changed = [(k, v, now.get(k)) for k, v in saved.items() if k not in RESUMABLE_CHANGES and now.get(k) != v]
    if changed:
        k, then, now = changed[0]
        raise InputError(f"{path}: written by a run with other settings (--{k} {then} then, {now} now); "
                         f"resume with the same settings or use another --out_dir")


# -----------------------------------------------------------------------------
# the loop's parts: optimizer, schedule, batches, precision, devices


def configure_optimizer(model, lr, weight_decay, device_type, lora_plus_ratio=1.0):
    """AdamW over the trainable parameters only (frozen GPT-2 weights get no optimizer state). Weight decay
    applies to 2-D weight matrices; biases, LayerNorms and LoRA's A and B are not decayed.

    LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): with lora_plus_ratio
    lambda != 1, LoRA's B matrices get their own group with learning rate lambda * lr (A keeps lr); B starts
    at 0 and, in wide layers, learns efficiently only with a larger step than A. Each group's "lr_scale" is
    its multiple of the schedule's learning rate (fit sets group["lr"] = lr_at(step) * lr_scale)."""
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
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to lr * min_lr_ratio."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def epoch_seed(seed, epoch):
    """One shuffling seed per (seed, epoch) pair, no two alike: seed + epoch would make seed 11711's epoch 1
    seed 11712's epoch 0, so that runs with neighbouring seeds would share data orders."""
    return seed * 2**32 + epoch


def epoch_batches(lengths, config, epoch, world_size=1):
    """This epoch's batches (lists of example indices): shuffled by (seed, epoch), similar lengths together.
    With several processes, a batch must hold at least one example per process; a smaller last one is dropped."""
    batches = batch_indices(lengths, config["batch_size"], shuffle=True, seed=epoch_seed(config["seed"], epoch))
    return [b for b in batches if len(b) >= world_size]


def micro_batches(indices, n):
    """Split a list into n nearly equal consecutive parts (fewer when it is shorter than n)."""
    size = math.ceil(len(indices) / n)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def compute_dtype(config, device_type):
    """auto: bfloat16 on a GPU that has it (half the memory traffic, same range as float32), else float32."""
    if config["dtype"] == "auto":
        return "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return config["dtype"]


def autocast_context(config, device_type):
    """bfloat16 autocast: matmuls in bfloat16, reductions such as softmax and the loss in float32."""
    if compute_dtype(config, device_type) == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def wrap_model(model, config, world_size):
    if config["compile"]:
        model = torch.compile(model)
    if world_size > 1:
        device = config["device"]
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    return model


def reset_peak_memory(device_type):
    """Start counting peak memory now (so a study that trains condition after condition in one process
    measures each on its own)."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the process's peak resident memory
        except OSError:
            pass


def peak_memory_bytes(device_type):
    """GPU: the most memory PyTorch had allocated. CPU: the process's peak resident memory (all of it)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    if device_type == "mps":
        return torch.mps.driver_allocated_memory()
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# -----------------------------------------------------------------------------
# results.json


def run_results(run, regime, model, progress):
    """What results.json holds. `score` and `metrics` are the final epoch's: every run gets the same fixed
    budget and nothing is selected on the dev set it is scored on. `best_score` and `best_epoch` are the best
    dev epoch's, by its `selection` figure (the course's practice; best/ holds that model)."""
    config, history = run.config, progress["history"]
    final = history[-1]
    best = max(history, key=lambda h: h.get("selection", h["score"]))
    return {
        "task": config["task"], "regime": regime, "method": "lora" if config["lora_r"] else "fft",
        "score": final["score"], "score_name": "accuracy" if config["task"] == "paraphrase" else "chrf",
        "metrics": {k: v for k, v in final.items() if k not in ("epoch", "train_loss", "score", "selection")},
        "best_score": best["score"], "best_epoch": best["epoch"],
        "train_seconds": progress["train_seconds"], "eval_seconds": progress["eval_seconds"],
        "tokens_per_second": progress["real_tokens"] / max(progress["train_seconds"], 1e-9),
        "real_tokens": progress["real_tokens"], "steps": progress["step"],
        "peak_memory_bytes": peak_memory_bytes(run.device_type),
        "total_parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "device": torch.cuda.get_device_name() if run.device_type == "cuda" else run.device_type,
        "world_size": run.world_size, "torch": torch.__version__, "history": history, "config": config,
    }


def print_results(results):
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items() if isinstance(v, (int, float)))
    print(f"{results['task']} {results['regime']} {results['method']}: {metrics} (dev, final epoch; the best, "
          f"{results['best_score']:.4f}, at epoch {results['best_epoch']}); train {results['train_seconds']:.1f}s, eval "
          f"{results['eval_seconds']:.1f}s, {results['tokens_per_second']:.0f} tokens/s, peak memory "
          f"{results['peak_memory_bytes'] / 2**20:.0f} MiB, {results['trainable_parameters']:,} of "
          f"{results['total_parameters']:,} parameters trained, on {results['device']}")


def main(train, settings, doc, argv=None):
    """The command line of train_sft.py and train_dpo.py: one-line errors, no traceback, for bad input."""
    try:
        train(parse_args(argv, settings, doc))
    except InputError as e:
        sys.exit(f"error: {e}")
