"""
Supervised fine-tuning (SFT) of GPT-2 on one of the two tasks, by full fine-tuning (FFT) or LoRA.

    python train_sft.py --task paraphrase                                # FFT of gpt2, the course's settings
    python train_sft.py --task sonnet --lora_r 8 --lora_alpha 16         # LoRA: only A and B train
    python train_sft.py --task paraphrase --checkpoint_every 500 --resume   # resumable; run again to continue
    torchrun --nproc_per_node 4 train_sft.py --task paraphrase           # several GPUs (DistributedDataParallel)

SFT maximises the likelihood of the target tokens given the prompt: with N target tokens in a batch,

    L_SFT = -(1/N) * sum over target tokens t of log p_theta(x_t | x_<t)

Paraphrase: the target is one token, "yes" or "no", after the course's prompt. Sonnets: the target is the
whole sonnet and its end-of-text token. Prompt and padding tokens are never in the loss (the batch's loss_mask).

Writes to --out_dir: best/ (the best dev score so far, as the course keeps it) and last/ (the latest epoch),
each a model folder eval.py and train_dpo.py read (FFT: config.json + model.safetensors, LoRA:
adapter.safetensors + adapter_config.json), checkpoint.pt (resumable state) and results.json.
The settings below are the defaults; each can be overridden from the command line (--help lists them).
"""

import argparse
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.batching import batch_indices, collate
from data.quora import paraphrase_example, read_quora
from data.sonnets import read_sonnets, sonnet_example
from eval import check_device, evaluate_paraphrase, evaluate_sonnets
from fileio import InputError, atomic_open, writable_dir, write_json
from lora import DEFAULT_TARGETS, apply_lora, lora_state_dict, save_lora
from model import ADAPTER_CONFIG, ADAPTER_FILE, check_source, default_device, load_model

# -----------------------------------------------------------------------------
# settings: name -> (default, type, why). Every one is a command-line flag: --name value.
SETTINGS = {
    "task": (None, str, "paraphrase or sonnet (required)"),
    "init_from": ("gpt2", str, "a GPT-2 name (gpt2 ... gpt2-xl), a model directory, or an earlier run's out_dir"),
    "data_dir": ("data", str, "where the course's files are (python -m data.download puts them there)"),
    "out_dir": (None, str, "where this run writes; default out/sft-{task}-{fft|lora}"),
    "epochs": (10, int, "the course's starter trains 10 epochs"),
    "batch_size": (8, int, "examples per optimizer step, the course's 8 (split over --grad_accum and GPUs)"),
    "grad_accum": (1, int, "split each batch into this many micro-batches: same update, less memory"),
    "lr": (None, float, "peak learning rate; default 1e-5 for FFT (the course's) and 2e-4 for LoRA "
                        "(Hu et al. 2021's GPT-2 setting: at 1e-5 a LoRA run barely moves)"),
    "warmup": (0.05, float, "fraction of the steps spent warming the learning rate up from 0 (stabilises "
                            "AdamW's first steps, whose moment estimates are still noise)"),
    "min_lr_ratio": (0.1, float, "cosine decay ends at lr * this (nanoGPT's and Chinchilla's 10x)"),
    "weight_decay": (0.0, float, "AdamW's decay, on 2-D weight matrices only; the course's starter uses 0"),
    "grad_clip": (1.0, float, "clip the global gradient norm to this (0 = off): one bad batch can't wreck a run"),
    "dropout": (0.1, float, "GPT-2's own (and the course's) dropout"),
    "lora_r": (0, int, "LoRA rank; 0 = full fine-tuning"),
    "lora_alpha": (16.0, float, "LoRA scale alpha: the update is (alpha / r) B A (alpha = 2r, a common choice)"),
    "lora_dropout": (0.0, float, "dropout on LoRA's input"),
    "lora_targets": (",".join(DEFAULT_TARGETS), str, "comma-separated Linear layers LoRA adapts (all of a block's)"),
    "seed": (11711, int, "the course's seed"),
    "device": (default_device(), str, "cuda, cuda:N, mps or cpu (the default is the best one here)"),
    "dtype": ("auto", str, "auto (bfloat16 autocast on a GPU that has it, else float32), float32 or bfloat16"),
    "compile": (False, bool, "torch.compile the model (worth it on a GPU for long runs)"),
    "train_limit": (None, int, "train on the first N examples only"),
    "dev_limit": (None, int, "evaluate on the first N dev examples only (paraphrase)"),
    "eval_batch_size": (64, int, "examples per batch when scoring the dev set"),
    "temperature": (1.2, float, "sonnet generation when scoring: the course's"),
    "top_p": (0.9, float, "sonnet generation when scoring: the course's"),
    "max_new_tokens": (128, int, "sonnet generation when scoring: the course's"),
    "resume": (False, bool, "continue from out_dir/checkpoint.pt (starts afresh, and says so, if there is none)"),
    "checkpoint_every": (0, int, "also save a resumable state every N optimizer steps (0: at epoch ends only)"),
}


def defaults(settings=SETTINGS):
    return {name: default for name, (default, _, _) in settings.items()}


def parse_bool(value):
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv, settings=SETTINGS, description=__doc__):
    parser = argparse.ArgumentParser(description=description.strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, (default, kind, why) in settings.items():
        if kind is bool:  # --resume, or --resume true / false
            parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=default, help=why)
        else:
            parser.add_argument(f"--{name}", type=kind, default=default, help=why, required=name == "task")
    return vars(parser.parse_args(argv))


def check_config(config, prefix="sft"):
    """Every setting that can be checked without loading anything; fills in the derived defaults."""
    def bad(name, why):
        raise InputError(f"--{name} {config[name]}: {why}")

    if config["task"] not in ("paraphrase", "sonnet"):
        bad("task", "must be paraphrase or sonnet")
    for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens"):
        if config[name] < 1:
            bad(name, "must be at least 1")
    if config["grad_accum"] > config["batch_size"]:
        bad("grad_accum", f"cannot split a batch of {config['batch_size']} into more micro-batches than examples")
    for name in ("train_limit", "dev_limit"):
        if config[name] is not None and config[name] < 1:
            bad(name, "must be at least 1 (leave it out to use every example)")
    for name in ("checkpoint_every",):
        if config[name] < 0:
            bad(name, "must be 0 (epoch ends only) or a positive number of steps")
    if config["lora_r"] < 0:
        bad("lora_r", "must be 0 (full fine-tuning) or a positive rank such as 8")
    if config["lora_r"] and not config["lora_alpha"] > 0:
        bad("lora_alpha", "must be positive")
    if config["lr"] is None:
        config["lr"] = 2e-4 if config["lora_r"] else 1e-5
    if not (config["lr"] > 0 and math.isfinite(config["lr"])):
        bad("lr", "must be a positive number such as 1e-5")
    for name, low, high in (("warmup", 0, 1), ("min_lr_ratio", 0, 1), ("dropout", 0, 0.999),
                            ("lora_dropout", 0, 0.999), ("top_p", 1e-9, 1)):
        if not low <= config[name] <= high:
            bad(name, f"must be between {low} and {high}")
    for name in ("weight_decay", "grad_clip", "temperature"):
        if not config[name] >= 0:
            bad(name, "must be 0 or more")
    if config["dtype"] not in ("auto", "float32", "bfloat16"):
        bad("dtype", "must be auto, float32 or bfloat16")
    check_device(config["device"])
    targets = [t.strip() for t in config["lora_targets"].split(",") if t.strip()]
    if not targets:
        bad("lora_targets", f"name at least one Linear layer, e.g. {','.join(DEFAULT_TARGETS)}")
    check_source(config["init_from"], "--init_from")
    if config["out_dir"] is None:
        config["out_dir"] = f"out/{prefix}-{config['task']}-{'lora' if config['lora_r'] else 'fft'}"
    writable_dir(config["out_dir"], "--out_dir")
    return config


# -----------------------------------------------------------------------------
# data

QUORA = {"train": "quora-train.csv", "dev": "quora-dev.csv"}
SONNETS = {"train": "sonnets.txt", "dev": "sonnets_held_out_dev.txt", "dev_true": "TRUE_sonnets_held_out_dev.txt"}


def load_task_data(config):
    """(training records, dev set): Quora pairs or sonnets. Read before any model is loaded, so that a
    missing or malformed file fails at once."""
    data_dir = Path(config["data_dir"])
    if config["task"] == "paraphrase":
        train = read_quora(data_dir / QUORA["train"], limit=config["train_limit"])
        dev = read_quora(data_dir / QUORA["dev"], limit=config["dev_limit"])
        if any(p.label is None for p in train + dev):
            raise InputError(f"{data_dir}: the Quora train and dev files need the is_duplicate column")
        return train, dev
    train = read_sonnets(data_dir / SONNETS["train"], limit=config["train_limit"])
    dev = (read_sonnets(data_dir / SONNETS["dev"]), read_sonnets(data_dir / SONNETS["dev_true"]))
    return train, dev


def sft_examples(task, records):
    """Paraphrase: prompt + the answer token. Sonnets: the whole sonnet + end-of-text, every token a target."""
    return [paraphrase_example(r) if task == "paraphrase" else sonnet_example(r) for r in records]


# -----------------------------------------------------------------------------
# the loss


def sequence_logprobs(logits, input_ids, loss_mask):
    """log p(target tokens | what precedes them), summed per sequence: (B,) float32.

    logits (B, T, V) at every position; input_ids, loss_mask (B, T). The logits at position t predict the
    token at t + 1, so the shift is: logits[:, :-1] scores input_ids[:, 1:], weighted by loss_mask[:, 1:].
    """
    assert logits.shape[:2] == input_ids.shape == loss_mask.shape, (logits.shape, input_ids.shape, loss_mask.shape)
    logits = logits[:, :-1].float()  # (B, T-1, V): in float32 even under bf16 autocast
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].float()  # (B, T-1)
    # log p(token) = its logit - log sum_v exp(logit_v): log_softmax without a second (B, T-1, V) tensor
    token_logps = logits.gather(2, targets.unsqueeze(2)).squeeze(2) - logits.logsumexp(-1)  # (B, T-1)
    return (token_logps * mask).sum(-1)


def target_window(batch):
    """The stretch of each row a loss reads: from the position before its first target token to its last
    target token. Returns (positions (B, W), input_ids (B, W), loss_mask (B, W)) for sequence_logprobs.

    Targets follow the prompt, so they are contiguous; a paraphrase row's window is 2 positions wide (the last
    prompt token, which predicts the answer, and the answer), so the output layer runs on 2 positions, not ~50.
    """
    B, T = batch.input_ids.shape
    first = batch.loss_mask.float().argmax(1)  # (B,) the first target token of each row
    start = (first - 1).clamp(min=0)  # the position that predicts it (a sonnet's first token has none)
    width = int((batch.lengths - start).max())
    positions = start[:, None] + torch.arange(width, device=start.device)[None, :]  # (B, W)
    inside = positions < batch.lengths[:, None]  # past a row's end: padding
    positions = positions.clamp(max=T - 1)
    input_ids = batch.input_ids.gather(1, positions)
    loss_mask = batch.loss_mask.gather(1, positions) * inside
    return positions, input_ids, loss_mask


def batch_logprobs(model, batch, device=None):
    """sequence_logprobs of each row of a right-padded batch, with the output layer applied only where read.
    No attention mask is needed: causal attention never looks right, where the padding is. The batch may stay
    on the CPU: its window is cut there (no GPU round trip) and what the model reads moves to `device`."""
    device = device or next(model.parameters()).device
    positions, input_ids, loss_mask = (t.to(device) for t in target_window(batch))
    logits = model(batch.input_ids.to(device), logits_at=positions)  # (B, W, V)
    return sequence_logprobs(logits, input_ids, loss_mask)


def check_lengths(examples, block_size):
    longest = max(range(len(examples)), key=lambda i: len(examples[i]))
    if len(examples[longest]) > block_size:
        raise InputError(f"training example {longest + 1} is {len(examples[longest])} tokens long, more than the "
                         f"model's block_size of {block_size} positions")


def predicted_targets(example):
    """How many of an example's target tokens the loss reads: all, except a first token with no prompt
    before it (nothing predicts a sequence's first token)."""
    return len(example.target) - (len(example.prompt) == 0)


def sft_loss(model, batch, normalizer=None):
    """(loss, number of target tokens). The loss is the summed token cross-entropy of the batch's targets
    divided by `normalizer` (default: their count, i.e. the mean). Gradient accumulation and several GPUs
    pass the whole effective batch's target count, so every target token weighs the same."""
    n_targets = int(batch.loss_mask[:, 1:].sum())
    return -batch_logprobs(model, batch).sum() / (normalizer or n_targets), n_targets


# -----------------------------------------------------------------------------
# model, optimizer, schedule


def load_policy(config):
    """The model to train: init_from, with fresh LoRA adapters when --lora_r is set (GPT-2 then frozen).

    An SFT run's LoRA folder loads as its base model with the SFT adapter folded in, so SFT->DPO with LoRA
    trains a new adapter on top of the SFT model."""
    model = load_model(config["init_from"], dropout=config["dropout"])
    if config["lora_r"]:
        targets = [t.strip() for t in config["lora_targets"].split(",") if t.strip()]
        try:
            apply_lora(model, r=config["lora_r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
                       targets=targets)
        except ValueError as e:
            raise InputError(f"--lora_targets {config['lora_targets']}: {e}") from None
    return model


def configure_optimizer(model, lr, weight_decay, device_type):
    """AdamW over the trainable parameters only (frozen GPT-2 weights get no optimizer state). Weight decay
    applies to 2-D weight matrices; biases, LayerNorms and LoRA's A and B are not decayed."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and not n.endswith((".lora_A", ".lora_B"))]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and not n.endswith((".lora_A", ".lora_B")))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def lr_at(step, total_steps, lr, warmup=0.05, min_lr_ratio=0.1):
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to lr * min_lr_ratio."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def epoch_batches(lengths, config, epoch, world_size=1):
    """This epoch's batches (lists of example indices): seeded by epoch, similar lengths together.
    With several processes, a batch must hold at least one example per process; a smaller last one is dropped."""
    batches = batch_indices(lengths, config["batch_size"], shuffle=True, seed=config["seed"] + epoch)
    return [b for b in batches if len(b) >= world_size]


def micro_batches(indices, n):
    """Split a list into n nearly equal consecutive parts (fewer when it is shorter than n)."""
    size = math.ceil(len(indices) / n)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# -----------------------------------------------------------------------------
# saving, resuming, scoring


def save_model(model, directory, config):
    """FFT: the hub layout (config.json + model.safetensors). LoRA: only the adapter, plus adapter_config.json
    naming the model it adapts, which is all model.load_model needs to rebuild the fine-tuned model."""
    directory = Path(directory)
    if not config["lora_r"]:
        model.save_pretrained(directory)
        return
    base = config["init_from"]
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    save_lora(model, directory / ADAPTER_FILE)
    write_json(directory / ADAPTER_CONFIG, {
        "base_model_name_or_path": base, "r": config["lora_r"], "lora_alpha": config["lora_alpha"],
        "target_modules": config["lora_targets"].split(","),
    })


def trainable_state(model):
    """LoRA: only A and B (the frozen rest is init_from). FFT: everything."""
    return lora_state_dict(model) or model.state_dict()


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, progress):
    """Everything needed to continue exactly: weights (only the trainable ones for LoRA: the rest is
    init_from), AdamW's moments, where we are in the data (epoch, batch) and every random number generator."""
    state = {"model": trainable_state(model), "optimizer": optimizer.state_dict(), "rng": rng_state(), **progress}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, model, optimizer):
    """Restore what save_checkpoint saved; returns the progress dict (epoch, batch, step, ...)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never runs code
        missing = set(trainable_state(model)) - set(state["model"])
        if missing:
            raise KeyError(f"it lacks {sorted(missing)[:3]} (was it written by a run with other settings?)")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise InputError(f"{path}: cannot resume from it: {e}") from None
    set_rng_state(state["rng"])
    return {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}


def evaluate(model, task, dev, config, device):
    """Dev score with eval.py's own functions: {accuracy, f1} or {chrf}; 'score' is the one to select on."""
    if task == "paraphrase":
        result = evaluate_paraphrase(model, dev, config["eval_batch_size"], device)
        return {"score": result["accuracy"], "accuracy": result["accuracy"], "f1": result["f1"],
                "predictions": result["predictions"]}
    held_out, references = dev
    result = evaluate_sonnets(model, held_out, references, device=device, temperature=config["temperature"],
                              top_p=config["top_p"], max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                              batch_size=config["eval_batch_size"])
    return {"score": result["chrf"], "chrf": result["chrf"], "sonnets": result["sonnets"]}


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


def setup_distributed(config):
    """Under torchrun (RANK in the environment): one process per device, gradients averaged by DDP."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if config["batch_size"] % world_size:
        raise InputError(f"--batch_size {config['batch_size']}: must be a multiple of the {world_size} processes")
    if config["device"].startswith("cuda"):
        config["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(config["device"])
    dist.init_process_group(backend="nccl" if config["device"].startswith("cuda") else "gloo")
    return rank, world_size


def finish(results, out_dir, rank):
    if rank == 0:
        write_json(Path(out_dir) / "results.json", results)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


# -----------------------------------------------------------------------------
# training


def train(config):
    """Run SFT as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    config = check_config({**defaults(), **config})
    rank, world_size = setup_distributed(config)
    master = rank == 0
    out_dir, device = Path(config["out_dir"]), config["device"]
    device_type = device.split(":")[0]
    records, dev = load_task_data(config)  # before the model: a missing file fails in a second
    examples = sft_examples(config["task"], records)

    reset_peak_memory(device_type)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    raw_model = load_policy(config).to(device)  # what we save and evaluate
    check_lengths(examples, raw_model.config.block_size)
    optimizer = configure_optimizer(raw_model, config["lr"], config["weight_decay"], device_type)
    model = wrap_model(raw_model, config, world_size)  # compiled and/or DDP; the same weights
    autocast = autocast_context(config, device_type)

    lengths = [len(e) for e in examples]
    total_steps = config["epochs"] * len(epoch_batches(lengths, config, 0, world_size))
    checkpoint = out_dir / "checkpoint.pt"
    progress = start_or_resume(config, checkpoint, raw_model, optimizer, master)
    if master:
        print(f"{config['task']} SFT ({describe(config)}) of {config['init_from']} on {device}: "
              f"{raw_model.num_parameters(trainable_only=True):,} of {raw_model.num_parameters():,} parameters "
              f"train; {len(examples)} examples, {total_steps} steps")

    while progress["epoch"] < config["epochs"]:
        epoch = progress["epoch"]
        batches = epoch_batches(lengths, config, epoch, world_size)
        model.train()
        bar = progress_bar(progress, len(batches), config, master)
        t0 = time.time()
        while progress["batch"] < len(batches):
            indices = batches[progress["batch"]]
            lr = set_lr(optimizer, progress["step"], total_steps, config)
            # every target token of the whole batch weighs the same, however it is split over GPUs and micro-batches
            n_targets = sum(predicted_targets(examples[i]) for i in indices)
            parts = micro_batches(indices[rank::world_size], config["grad_accum"])  # this process's share
            loss_sum, real_tokens = 0.0, 0
            for k, part in enumerate(parts):
                batch = collate([examples[i] for i in part])  # on the CPU; batch_logprobs moves what it needs
                with gradient_sync(model, k == len(parts) - 1), autocast:
                    loss, _ = sft_loss(model, batch, normalizer=n_targets / world_size)
                loss.backward()
                loss_sum += loss.item() / world_size
                real_tokens += int(batch.lengths.sum())
            loss_sum, real_tokens = all_reduce_sum(loss_sum, real_tokens, device, world_size)
            t0 = optimizer_step(raw_model, optimizer, loss_sum, real_tokens, lr, config, progress, checkpoint,
                                bar, t0, len(batches), master)
        bar.close()
        progress["train_seconds"] += time.time() - t0
        end_of_epoch(raw_model, optimizer, config, dev, progress, loss_sum, checkpoint, master, world_size)

    results = run_results(config, "sft", raw_model, progress, device_type, world_size) if master else None
    if master:
        print_results(results)
    return finish(results, out_dir, rank)


# -----------------------------------------------------------------------------
# the loop's pieces, shared with train_dpo.py


def describe(config):
    return f"LoRA r={config['lora_r']}" if config["lora_r"] else "full fine-tuning"


def wrap_model(model, config, world_size):
    if config["compile"]:
        model = torch.compile(model)
    if world_size > 1:
        device = config["device"]
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    return model


def gradient_sync(model, last_micro_batch):
    """DDP averages gradients over processes once per batch, on its last micro-batch; not on the others."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_batch else nullcontext()


def all_reduce_sum(loss_sum, real_tokens, device, world_size):
    if world_size == 1:
        return loss_sum, real_tokens
    stats = torch.tensor([loss_sum, real_tokens], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    return stats[0].item(), int(stats[1].item())


# settings a resumed run may change: they do not change what is trained
RESUMABLE_CHANGES = ("resume", "checkpoint_every", "device", "out_dir", "data_dir", "cache_dir", "eval_batch_size",
                     "compile", "grad_accum", "live_reference")


def start_or_resume(config, checkpoint, model, optimizer, master):
    trained_with = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_score": None, "history": [], "train_seconds": 0.0,
                "eval_seconds": 0.0, "real_tokens": 0, "config": trained_with}
    if config["resume"]:
        if checkpoint.exists():
            progress = load_checkpoint(checkpoint, model, optimizer)
            changed = {k: (v, trained_with.get(k)) for k, v in progress.get("config", {}).items()
                       if trained_with.get(k) != v}
            if changed:
                k, (then, now) = next(iter(changed.items()))
                raise InputError(f"{checkpoint}: written by a run with other settings (--{k} {then} then, {now} now); "
                                 f"resume with the same settings or use another --out_dir")
            if master:
                print(f"resuming from {checkpoint}: epoch {progress['epoch'] + 1}, step {progress['step']}")
        elif master:
            print(f"--resume: no {checkpoint} yet, so starting from the beginning")
    return progress


def progress_bar(progress, n_batches, config, master):
    return tqdm(total=n_batches, initial=progress["batch"], desc=f"epoch {progress['epoch'] + 1}/{config['epochs']}",
                disable=not master or None)


def set_lr(optimizer, step, total_steps, config):
    lr = lr_at(step, total_steps, config["lr"], config["warmup"], config["min_lr_ratio"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model, optimizer, loss, real_tokens, lr, config, progress, checkpoint, bar, t0, n_batches,
                   master):
    """Stop on a NaN/inf loss (keeping the last good checkpoint), clip, update, count, checkpoint every N
    steps. Returns the time the training clock restarts from."""
    if not math.isfinite(loss):
        raise InputError(f"the loss is {loss} at step {progress['step']} (epoch {progress['epoch'] + 1}); stopped. "
                         f"The last good state is {checkpoint if checkpoint.exists() else 'not saved'}; try a lower --lr")
    if config["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    progress["step"] += 1
    progress["batch"] += 1
    progress["real_tokens"] += real_tokens
    elapsed = progress["train_seconds"] + time.time() - t0
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{progress['real_tokens'] / elapsed:.0f}")
    bar.update()
    if config["checkpoint_every"] and progress["step"] % config["checkpoint_every"] == 0 and progress["batch"] < n_batches:
        progress["train_seconds"] += time.time() - t0
        t0 = time.time()
        if master:
            save_checkpoint(checkpoint, model, optimizer, progress)
    return t0


def end_of_epoch(model, optimizer, config, dev, progress, train_loss, checkpoint, master, world_size,
                 extra_metrics=None):
    """Score on dev, keep last/ and best/, save a resumable state. extra_metrics(model) adds DPO's."""
    t0 = time.time()
    out_dir = checkpoint.parent
    if master:
        metrics = evaluate(model, config["task"], dev, config, config["device"])
        if extra_metrics is not None:
            metrics.update(extra_metrics(model))
        save_model(model, out_dir / "last", config)
        improved = progress["best_score"] is None or metrics["score"] > progress["best_score"]
        if improved:
            progress["best_score"] = metrics["score"]
            save_model(model, out_dir / "best", config)
            write_json(out_dir / "best_dev_predictions.json",
                       {k: v for k, v in metrics.items() if k in ("predictions", "sonnets")})
        summary = {k: v for k, v in metrics.items() if k not in ("predictions", "sonnets")}
        progress["history"].append({"epoch": progress["epoch"] + 1, "train_loss": train_loss, **summary})
        print(f"epoch {progress['epoch'] + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "score")
              + ("  (best so far)" if improved else ""))
    progress["eval_seconds"] += time.time() - t0
    progress["epoch"] += 1
    progress["batch"] = 0
    if master:
        save_checkpoint(checkpoint, model, optimizer, progress)
    if world_size > 1:
        dist.barrier()


def run_results(config, regime, model, progress, device_type, world_size=1):
    """What results.json holds: the best dev score, its cost, and the full config."""
    best = max(progress["history"], key=lambda h: h["score"])
    return {
        "task": config["task"], "regime": regime, "method": "lora" if config["lora_r"] else "fft",
        "score": best["score"], "score_name": "accuracy" if config["task"] == "paraphrase" else "chrf",
        "metrics": {k: v for k, v in best.items() if k in ("accuracy", "f1", "chrf")}, "best_epoch": best["epoch"],
        "train_seconds": progress["train_seconds"], "eval_seconds": progress["eval_seconds"],
        "tokens_per_second": progress["real_tokens"] / max(progress["train_seconds"], 1e-9),
        "real_tokens": progress["real_tokens"], "steps": progress["step"],
        "peak_memory_bytes": peak_memory_bytes(device_type),
        "total_parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "device": torch.cuda.get_device_name() if device_type == "cuda" else device_type,
        "world_size": world_size, "torch": torch.__version__, "history": progress["history"], "config": config,
    }


def print_results(results):
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items())
    print(f"{results['task']} {results['regime']} {results['method']}: {metrics} (dev, best epoch "
          f"{results['best_epoch']}); train {results['train_seconds']:.1f}s, eval {results['eval_seconds']:.1f}s, "
          f"{results['tokens_per_second']:.0f} tokens/s, peak memory {results['peak_memory_bytes'] / 2**20:.0f} MiB, "
          f"{results['trainable_parameters']:,} of {results['total_parameters']:,} parameters trained, "
          f"on {results['device']}")


def main(argv=None):
    try:
        train(parse_args(argv))
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
