"""
What each method costs, measured side by side on this machine (after nanoGPT's bench.py).

    python bench.py --quick --out bench.json     # a few minutes on a 2-core CPU
    python bench.py                              # more steps, 12 sonnets generated at once, 16 trained on
    python bench.py --device cuda --batch_size 64
    python bench.py --data_dir data              # the course's files (python -m data.download), not the sample

GPT-2 124M's shape with random weights (nothing to download: a step costs the same whatever the values),
trained on real Quora pairs and sonnets (their lengths, hence their padding, are what training sees): the
course's quora-train.csv and sonnets.txt in --data_dir, by default the small sample in data/samples.
Every ratio compares two things measured in the same run on the same batch and dtype, after warm-up:
the median of several steps, taken in turns (A, B, C, A, B, C, ...) so that a machine busy with something
else slows all of them alike, with the device synchronised around every timed phase.

Where the time goes, in FLOPs per token (N = the weights of the blocks' matrices, 85M at 124M's shape;
d = width, V = vocabulary, L = layers, T = sequence length):
    forward 2N, backward 4N (2N for the input gradient, 2N for the weight gradient)
    full fine-tuning (FFT)  6N + 12 L d T                                    (Kaplan et al. 2020, PaLM app. B)
    LoRA                    4N + 12 L d T: a frozen weight needs no weight gradient, and no AdamW state
    output layer            6 d V per token where a loss reads it (once per Quora pair, every sonnet token)
    DPO                     policy on chosen + rejected (2x the rows of SFT) + reference forward (2N each)
    generation, KV cache    2N per new token; without the cache every step recomputes the whole prefix
"""

import copy
import math
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import PRETRAINED, from_pretrained, save_pretrained
from data.batching import collate, left_pad
from data.quora import read_quora
from data.sonnets import read_sonnets, sonnet_example, split_prompt
from data.tasks import QUORA, SONNETS
from data.tokenizer import END_OF_TEXT, encode
from eval import answers_yes
from fileio import InputError, writable_dir, write_json
import flags
from flags import NON_NEGATIVE, POSITIVE, at_least, between, check_device, default_device, one_of
from lora import DEFAULT_TARGETS, apply_lora
from model import GPT, GPTConfig
# the training scripts' own losses, data and settings, so that a step here is the step training takes
from preferences import paraphrase_pairs, sonnet_pairs
from train_dpo import SETTINGS as DPO_SETTINGS, dpo_loss, reference_logps
from train_sft import SETTINGS as SFT_SETTINGS, batch_logprobs, sft_loss, target_window
# the training loop's helpers
from trainer import (autocast_context, configure_optimizer, epoch_batches, peak_memory_bytes, reset_peak_memory,
                     wrap_model)

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# settings: each row is a flag (flags.py); --quick swaps in QUICK's values for the flags not given
SETTINGS = {
    "quick": (False, bool, None, "fewer steps and rows: QUICK's values for the flags not given"),
    "out": (None, Path, None, "write the figures as JSON to this file"),
    "size": ("gpt2", str, one_of(*PRETRAINED), "the model's shape (random weights): gpt2 is 124M"),
    "n_layer": (None, int, at_least(1), "change the size's number of layers"),
    "n_head": (None, int, at_least(1), "change the size's number of heads"),
    "n_embd": (None, int, at_least(1), "change the size's width"),
    "device": (default_device(), str, None, "cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", str, one_of("auto", "float32", "bfloat16"), "auto: bfloat16 on a GPU with it, as training"),
    "batch_size": (8, int, at_least(1), "Quora pairs per training step: the course's batch"),
    "big_batch_size": (64, int, at_least(1), "a throughput-sized batch, measured on a GPU (FFT, LoRA, MFU, epoch)"),
    "warmup": (2, int, NON_NEGATIVE, "untimed rounds first (allocations, AdamW's state, kernel selection)"),
    "steps": (7, int, at_least(1), "timed rounds; each figure is the median"),
    "lora_r": (8, int, at_least(1), "LoRA's rank"),
    "lora_alpha": (16.0, float, POSITIVE, "LoRA's scale alpha (the update is alpha / r B A)"),
    "score_pairs": (256, int, at_least(1), "paraphrase prompts scored (eval.answers_yes)"),
    "sonnet_rows": (12, int, at_least(1), "sonnets generated at once"),
    "sonnet_batch": (16, int, at_least(1), "sonnets per sonnet training step: DPO's batch has twice the rows"),
    "sonnet_layers": (0, int, NON_NEGATIVE, "layers of the sonnet steps' model (0: the size's own)"),
    "new_tokens": (128, int, between(1, 1024 - 37), "tokens generated per sonnet; a prompt (up to 37) + them fit 1024"),
    "generate_runs": (3, int, at_least(1), "timed generations with the cache (median); the uncached one runs once"),
    "data_dir": (ROOT / "data" / "samples", Path, None, "the course's quora-train.csv and sonnets.txt (a sample here)"),
    "quora": (None, Path, None, "labelled Quora pairs in the course's format (default: --data_dir's)"),
    "sonnets": (None, Path, None, "sonnets in the course's format (default: --data_dir's)"),
    "peak_tflops": (0.0, float, NON_NEGATIVE, "the device's peak TFLOP/s for MFU (0: measure it with a matmul)"),
    "compile": (False, bool, None, "torch.compile our model's steps, as train_sft.py --compile"),
    "threads": (0, int, NON_NEGATIVE, "CPU threads for PyTorch (0: its default, one per core)"),
    "seed": (0, int, None, "the random seed of weights, batches and prompts"),
}
QUICK = dict(warmup=1, steps=3, score_pairs=32, sonnet_rows=2, generate_runs=1, sonnet_batch=1, sonnet_layers=2)

PARAPHRASE_TRAIN_PAIRS = 283_003  # the course's quora-train.csv: one epoch of FFT SFT is what we time on a GPU
SFT_DROPOUT = SFT_SETTINGS["dropout"][0]  # train_sft.py's default, so steps cost what the training's cost
SFT_GRAD_CLIP = SFT_SETTINGS["grad_clip"][0]
DPO_DROPOUT = DPO_SETTINGS["dropout"][0]  # train_dpo.py's: off
DPO_BETA = DPO_SETTINGS["beta"][0]


# -----------------------------------------------------------------------------
# timing


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def clock(device):
    synchronize(device)
    return time.perf_counter()


def train_step(model, optimizer, loss_fn, autocast, device, split=True):
    """One optimizer step as train_sft.py takes it. Returns seconds (forward, backward, optimizer) with split,
    else the whole step's seconds. Timing the phases needs a device synchronisation between them, which on a
    GPU stops the CPU from queueing the next phase's kernels while the GPU works: so a GPU's step time is
    measured without it, on steps of its own (on a CPU there is nothing to synchronise)."""
    t0 = clock(device)
    with autocast():
        loss = loss_fn(model)
    t1 = clock(device) if split else None
    loss.backward()
    t2 = clock(device) if split else None
    if SFT_GRAD_CLIP > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], SFT_GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = clock(device)
    return (t1 - t0, t2 - t1, t3 - t2) if split else t3 - t0


def time_in_turns(cases, warmup, steps, device):
    """cases: {name: (model, optimizer, loss_fn, autocast)}. One step of each in turn, warmup + steps rounds.
    Returns {name: {"step", "forward", "backward", "optimizer"}}: medians of the timed rounds, in seconds."""
    on_gpu = str(device).startswith("cuda")
    phases, whole = {name: [] for name in cases}, {name: [] for name in cases}
    for round_ in range(warmup + steps):
        for name, case in cases.items():
            times = train_step(*case, device)
            step_s = train_step(*case, device, split=False) if on_gpu else sum(times)
            if round_ >= warmup:
                phases[name].append(times)
                whole[name].append(step_s)
    return {name: {"step": statistics.median(whole[name]),
                   **{phase: statistics.median(t[i] for t in times)
                      for i, phase in enumerate(("forward", "backward", "optimizer"))}}
            for name, times in phases.items()}


def timed(fn, device):
    t0 = clock(device)
    result = fn()
    return result, clock(device) - t0


# -----------------------------------------------------------------------------
# what a step computes: the losses the training scripts use, and Hugging Face's for comparison


def sft_step_loss(examples, device):
    """train_sft.py's step: collate, then its loss (the output layer only where a loss reads it)."""
    return lambda model: sft_loss(model, collate(examples).to(device))[0]


def full_logits_loss(batch):
    """The same loss with the output layer at every position, as Hugging Face computes it: same work as HF."""
    def loss_fn(model):
        logits = model(batch.input_ids)[:, :-1]
        labels = batch.input_ids[:, 1:].masked_fill(batch.loss_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss_fn


def hf_loss(batch):
    """GPT2LMHeadModel's own loss (labels -100 outside the targets). No attention mask: right padding needs
    none (causal attention never looks right), and without one HF takes its fastest attention path."""
    labels = batch.input_ids.masked_fill(batch.loss_mask == 0, -100)
    return lambda model: model(input_ids=batch.input_ids, labels=labels).loss


def dpo_step_loss(pairs, reference, device, autocast, path="auto"):
    """train_dpo.py's step on a batch of preference pairs: one forward of chosen + rejected (as
    train_dpo.concatenated_logps) and the DPO loss. reference: a frozen model, whose log-probabilities are computed
    every step as --live_reference does (train_dpo.reference_logps), or (chosen, rejected) log-probabilities
    computed once. path: train_sft.batch_logprobs' ("auto" as training, or "plain" / "chunked" forced)."""
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]

    def loss_fn(model):
        logps = batch_logprobs(model, collate(chosen + rejected), device, path=path)
        if isinstance(reference, tuple):
            ref_chosen, ref_rejected = reference
        else:
            ref_chosen, ref_rejected = reference_logps(reference, pairs, {"eval_batch_size": len(pairs),
                                                                          "device": device}, autocast())
        losses, _, _ = dpo_loss(logps[:len(pairs)], logps[len(pairs):], ref_chosen.to(device),
                                ref_rejected.to(device), DPO_BETA)
        return losses.mean()
    return loss_fn


# -----------------------------------------------------------------------------
# FLOPs and bytes: the counts that explain the times


def block_weights(config):
    """N: the weights of the blocks' matrices (attention 4 d^2, MLP 8 d^2 per layer), which every token meets."""
    return 12 * config.n_layer * config.n_embd ** 2


def train_flops(config, lengths, n_targets, lora=False):
    """Model FLOPs of one training step on real tokens: (6N or LoRA's 4N) per token, attention's 12 L d T per
    token, and the output layer's 6 d V once per target token. Padding is not counted: these are useful FLOPs."""
    per_token = (4 if lora else 6) * block_weights(config)
    attention = 12 * config.n_layer * config.n_embd * sum(n * n for n in lengths)
    return per_token * sum(lengths) + attention + 6 * config.n_embd * config.vocab_size * n_targets


def padding_efficiency(lengths, batches):
    """Real tokens over computed tokens: each batch computes rows x its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / computed


def saved_activation_bytes(model, loss_fn, autocast):
    """Bytes autograd keeps from one forward for the backward (weights not counted), each storage once."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss_fn(model)
    return sum(saved.values())


def state_bytes(model, optimizer):
    """(weights, gradients, AdamW state) in bytes; gradients and state exist for trainable weights only."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    return weights, grads, adam


def measure_peak_flops(device, n=8192, repeats=10, dtype=torch.bfloat16):
    """The device's matmul rate (FLOP/s) on n x n matrices: the best a model's matmuls can hope for."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _, seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds


# -----------------------------------------------------------------------------
# peak memory: each method trains in a fresh process, so nothing another method allocated is counted


def resident_bytes():
    """This process's resident memory now (Linux); 0 where /proc is not there (the peak then includes all)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_of_method(config, rows, lora_targets, device, dtype, lora_r, lora_alpha, compile=False,
                          n_steps=2, kind="sft"):
    """Peak memory of training steps. GPU: the most PyTorch allocated (torch.cuda.max_memory_allocated).
    CPU: the process's peak resident memory (Linux VmHWM, reset after the model is built, so building's
    transients are not counted) minus its resident memory before the model existed. Either way weights,
    gradients, AdamW state, activations and every phase's temporaries are in it.
    kind: "sft" (rows are Examples) or "dpo" (rows are Pairs; the reference log-probabilities are computed
    once before the steps, from the starting model, as train_dpo.py does)."""
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    before = current_bytes(device_type)
    model = GPT(config).to(device).train()
    if lora_targets:
        apply_lora(model, lora_r, lora_alpha, targets=lora_targets)
    optimizer = configure_optimizer(model, 1e-5, 0.0, device_type)
    autocast = lambda: autocast_context({"dtype": dtype}, device_type)  # noqa: E731
    step_model = wrap_model(model, {"compile": compile}, 1)
    if kind == "dpo":
        reference = reference_logps(model, rows, {"eval_batch_size": len(rows), "device": device}, autocast())
        loss_fn = dpo_step_loss(rows, reference, device, autocast)
    else:
        loss_fn = sft_step_loss(rows, device)
    reset_peak_memory(device_type)
    for _ in range(n_steps):
        train_step(step_model, optimizer, loss_fn, autocast, device)
    synchronize(device)
    return peak_memory_bytes(device_type) - before


def peak_memory_of_logprobs(config, pairs, device, dtype, path):
    """Peak memory growth of one policy log-probability and its backward on a DPO batch (chosen + rejected
    rows), from just after the model is built: activations, the output layer's temporaries and the gradients.
    path: train_sft.batch_logprobs' "plain" (the window's whole logits) or "chunked"."""
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    synchronize(device)
    before = current_bytes(device_type)
    reset_peak_memory(device_type)
    with autocast_context({"dtype": dtype}, device_type):
        logps = batch_logprobs(model, batch, device, path=path)
    logps.sum().backward()
    synchronize(device)
    return peak_memory_bytes(device_type) - before


def current_bytes(device_type):
    """What peak_memory_bytes counts, now: allocated (GPU), driver memory (MPS) or resident memory (CPU)."""
    return {"cuda": torch.cuda.memory_allocated, "mps": torch.mps.driver_allocated_memory}.get(
        device_type, resident_bytes)()


def _memory_child(queue, measure, args, threads):
    torch.set_num_threads(threads)  # the parent's (--threads)
    try:
        queue.put(measure(*args))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        queue.put(e)


def peak_memory_in_fresh_processes(jobs, device):
    """{name: measure(*args)} for jobs {name: (measure, args)}, each in a fresh (spawned) process, so no
    method's memory counts another's. On a CPU one process per core at a time (each has its own peak); on a
    GPU one at a time (they would share its memory)."""
    context = multiprocessing.get_context("spawn")
    at_once = 1 if device.startswith("cuda") else os.cpu_count() or 1
    results, running = {}, []
    for name, (measure, args) in jobs.items():
        if len(running) == at_once:  # wait for the oldest
            oldest = running.pop(0)
            results[oldest[0]] = child_result(*oldest)
        queue = context.Queue()
        process = context.Process(target=_memory_child, args=(queue, measure, args, torch.get_num_threads()))
        process.start()
        running.append((name, queue, process))
    for name, queue, process in running:
        results[name] = child_result(name, queue, process)
    return {name: results[name] for name in jobs}


def child_result(name, queue, process):
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not process.is_alive():  # killed (out of memory?) before it could answer
                raise RuntimeError(f"the process measuring {name}'s peak memory died (exit code "
                                   f"{process.exitcode})") from None
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


# -----------------------------------------------------------------------------
# generation: ours with and without the KV cache, and Hugging Face's generate with the same settings


def random_prompts(n, low, high, generator, vocab_size):
    lengths = torch.randint(low, high + 1, (n,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in lengths]


def generate_ours(model, input_ids, attention_mask, n_tokens, use_cache, device):
    return model.generate(input_ids, n_tokens, temperature=1.2, top_p=0.9, attention_mask=attention_mask,
                          eos_token_id=None, use_cache=use_cache,
                          generator=torch.Generator(device=device).manual_seed(0))


def generate_hf(hf_model, input_ids, attention_mask, n_tokens):
    """The course's sampling (temperature 1.2, top-p 0.9, nothing else: HF's default top_k=50 is off), every row
    writing exactly n_tokens (no end-of-text stop), with HF's KV cache."""
    return hf_model.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.2, top_p=0.9,
                             top_k=0, max_new_tokens=n_tokens, eos_token_id=None, pad_token_id=END_OF_TEXT,
                             use_cache=True)


# -----------------------------------------------------------------------------
# the run


def import_transformers():
    """transformers is a test-only package: without it, the comparisons with Hugging Face are skipped."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -r requirements-test.txt): the two comparisons with "
              "Hugging Face's GPT-2 are skipped")
        return None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def throughput(config, fft, lora, examples, args, autocast, table):
    """At a throughput-sized batch (a typical one of train_sft's at --big_batch_size): LoRA over FFT, step and
    peak memory; FFT SFT's model FLOPs utilisation (MFU) on real tokens; and the seconds one epoch of the
    course's 283,003 training pairs takes at that step time. Returns {mfu, paraphrase_epoch_s}.
    Meant for a GPU (run() calls it there); it runs anywhere, so tests run it on the CPU."""
    device = args["device"]
    pool = [examples[i % len(examples)] for i in range(max(len(examples), args["big_batch_size"]))]
    lengths = [len(e) for e in pool]
    big = [pool[i] for i in median_length_batch(lengths, epoch_batches(lengths, {"batch_size": args["big_batch_size"],
                                                                                 "seed": args["seed"]}, 0))]
    step = time_in_turns({"FFT": (*fft, sft_step_loss(big, device), autocast),
                          "LoRA": (*lora, sft_step_loss(big, device), autocast)}, args["warmup"], args["steps"], device)
    memory = peak_memory_in_fresh_processes(
        {name: (peak_memory_of_method, (config, big, targets, device, args["dtype"], args["lora_r"], args["lora_alpha"],
                                        args["compile"]))
         for name, targets in (("FFT", None), ("LoRA", DEFAULT_TARGETS))}, device)
    table.row(f"LoRA / FFT at a batch of {len(big)}, step", f"{step['LoRA']['step'] / step['FFT']['step']:.2f}",
              f"FFT {step['FFT']['step'] * 1e3:.1f} ms, LoRA {step['LoRA']['step'] * 1e3:.1f} ms")
    table.row(f"LoRA / FFT at a batch of {len(big)}, peak memory", f"{memory['LoRA'] / memory['FFT']:.2f}",
              f"FFT {memory['FFT'] / 2 ** 20:.0f} MiB, LoRA {memory['LoRA'] / 2 ** 20:.0f} MiB")
    bf16 = isinstance(autocast(), torch.autocast)
    peak = args["peak_tflops"] * 1e12 or measure_peak_flops(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    batch = collate(big)
    flops = train_flops(config, batch.lengths.tolist(), int(batch.loss_mask.sum()))
    figures = {"mfu": flops / step["FFT"]["step"] / peak,
               "paraphrase_epoch_s": math.ceil(PARAPHRASE_TRAIN_PAIRS / len(big)) * step["FFT"]["step"]}
    source = "--peak_tflops" if args["peak_tflops"] else f"measured: {'bf16' if bf16 else 'fp32'} matmul"
    table.row("MFU, FFT SFT, on real tokens", f"{100 * figures['mfu']:.1f}%",
              f"batch of {len(big)}, peak {peak / 1e12:.1f} TFLOP/s ({source}); target >= 45% (H100)")
    table.row("one epoch of paraphrase FFT SFT", f"{figures['paraphrase_epoch_s']:.1f} s",
              f"{PARAPHRASE_TRAIN_PAIRS:,} pairs in batches of {len(big)} like this one; target <= 25 s (H100)")
    return figures


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = device
    cpuinfo = Path("/proc/cpuinfo")
    if device == "cpu" and cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = f"cpu ({models[0]})" if models else name
    n = torch.get_num_threads()
    return f"{name}, {n} thread{'s' if n > 1 else ''}" if device == "cpu" else name


def machine_load():
    """Other work on the machine slows everything down, and with one PyTorch thread per core very unevenly:
    every parallel operation waits for its slowest thread, and a thread that shares its core waits long."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    load, cores = os.getloadavg()[0], os.cpu_count()
    busy = (f" (busy: other processes share the {cores} cores, so the figures are noisy"
            f"{'; --threads 1 suffers least' if torch.get_num_threads() > 1 else ''})") if load > cores - 0.5 else ""
    return f"load average {load:.1f} over the last minute, {cores} cores{busy}"


def median_length_batch(lengths, batches):
    """The batch of median padded length among the training's own batches: a typical step."""
    return sorted(batches, key=lambda b: (max(lengths[i] for i in b), len(b)))[len(batches) // 2]


def model_config(args):
    shape = {**PRETRAINED[args["size"]], **{k: args[k] for k in ("n_layer", "n_head", "n_embd")
                                         if args[k] is not None}}
    return GPTConfig(**shape, dropout=SFT_DROPOUT)


class Table:
    """Rows printed as they are measured: what, value, a note (the target, or the count that explains it)."""

    def row(self, what, value, note=""):
        print(f"  {what:<52} {value:>12}  {note}", flush=True)


def autocast_of(args):
    """A fresh autocast context at each call, as train_sft.py's --dtype makes it."""
    return lambda: autocast_context({"dtype": args["dtype"]}, args["device"].split(":")[0])


def unwrapped(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the model itself


def how_memory_is_measured(device_type):
    return {"cuda": "torch.cuda.max_memory_allocated", "mps": "MPS driver memory after the steps (no peak counter)"
            }.get(device_type, "growth of peak resident memory (VmHWM)") + ", a fresh process per method"


def describe_batch(batch, rows):
    return (f"{batch.input_ids.size(0)} {rows} x {batch.input_ids.size(1)} positions, {int(batch.lengths.sum())} "
            f"real tokens, {int(batch.loss_mask.sum())} targets")


def print_steps(title, timings, args, batches):
    """The split of each step (forward, backward, optimizer) as a table."""
    print(f"\n{title}, median of {args['steps']} after {args['warmup']} warm-up, in turns; {batches}")
    print(f"  {'':<40} {'step':>8} {'forward':>8} {'backward':>8} {'optimizer':>9}")
    for name, t in timings.items():
        print(f"  {name:<40} {t['step']:>7.3f}s {t['forward']:>7.3f}s {t['backward']:>7.3f}s {t['optimizer']:>8.3f}s")
    print()


# -----------------------------------------------------------------------------
# the figures, in the order run() measures them; each prints its rows and returns its bench.json keys


def read_data(args):
    """(labelled Quora pairs, sonnets), read before any model is built: a missing or malformed file fails first."""
    pairs = read_quora(args["quora"])
    if not pairs or any(p.label is None for p in pairs):
        raise InputError(f"--quora {args['quora']}: needs labelled pairs (the is_duplicate column)")
    sonnets = read_sonnets(args["sonnets"])
    for sonnet in sonnets:
        try:
            split_prompt(sonnet.text)  # DPO's prompt is the first 3 lines: a sonnet needs more
        except ValueError as e:
            raise InputError(f"--sonnets {args['sonnets']}: sonnet {sonnet.number}: {e}") from None
    return pairs, sonnets


def padding_figures(lengths, batches, args, table):
    """How much of a step's work is on real tokens, in the batches train_sft.py builds (batch_indices: shuffled
    pools, sorted by length), and in file order for comparison."""
    in_file_order = [list(range(i, min(i + args["batch_size"], len(lengths))))
                     for i in range(0, len(lengths), args["batch_size"])]
    figures = {"padding_efficiency": padding_efficiency(lengths, batches)}
    table.row("padding efficiency (real / computed tokens)", f"{figures['padding_efficiency']:.3f}",
              f"target >= 0.9; train_sft's batches of {args['batch_size']} (unsorted, in file order: "
              f"{padding_efficiency(lengths, in_file_order):.3f})")
    return figures


def load_models(config, transformers, device, table):
    """(SFT's model, DPO's, transformers' GPT2LMHeadModel or None): the same random weights, saved and loaded
    back as a trained model is (the load is timed), each with its training's dropout."""
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(GPT(config), directory)
        model, load_s = timed(lambda: from_pretrained(directory, dropout=SFT_DROPOUT).to(device), device)
        dpo_model = from_pretrained(directory, dropout=DPO_DROPOUT).to(device)  # DPO trains without dropout
        hf_model = None
        if transformers is not None:  # the same weights, the same dropout
            p = SFT_DROPOUT
            hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory, resid_pdrop=p, embd_pdrop=p,
                                                                    attn_pdrop=p).to(device)
    table.row("load (checkpoint.from_pretrained)", f"{load_s:.2f} s", f"{model.num_parameters() / 1e6:.0f}M parameters")
    return model, dpo_model, hf_model


def scoring_rate(model, examples, args, table):
    """What evaluation costs: paraphrase prompts scored per second (eval.answers_yes). Printed only."""
    prompts = [examples[i % len(examples)].prompt for i in range(args["score_pairs"])]
    answers_yes(model, prompts[:8], 64, args["device"])  # warm-up
    _, score_s = timed(lambda: answers_yes(model, prompts, 64, args["device"]), args["device"])
    table.row("paraphrase scoring (eval.answers_yes, batches of 64)", f"{args['score_pairs'] / score_s:.0f} pairs/s",
              f"the 40,429 dev pairs: {40429 / (args['score_pairs'] / score_s) / 60:.1f} min")


def step_cases(model, hf_model, examples, args):
    """SFT's steps on one batch: {name: (model, optimizer, loss_fn, autocast)} for time_in_turns. Ours, ours
    with the output layer everywhere, transformers', and LoRA on all block Linears and on attn.c_attn only."""
    device, device_type, autocast = args["device"], args["device"].split(":")[0], autocast_of(args)
    wrap = lambda m: wrap_model(m, {"compile": args["compile"]}, 1)  # noqa: E731
    batch = collate(examples).to(device)
    model.train()
    optimizer = configure_optimizer(model, 1e-5, 0.0, device_type)
    cases = {"SFT, FFT (ours)": (wrap(model), optimizer, sft_step_loss(examples, device), autocast),
             "SFT, FFT, output layer everywhere": (model, optimizer, full_logits_loss(batch), autocast)}
    if hf_model is not None:
        hf_model.train()
        cases["SFT, FFT (transformers)"] = (hf_model, configure_optimizer(hf_model, 1e-5, 0.0, device_type),
                                            hf_loss(batch), autocast)
    for name, targets in (("SFT, LoRA all block Linears", DEFAULT_TARGETS),
                          ("SFT, LoRA attn.c_attn", ("attn.c_attn",))):
        lora_model = apply_lora(copy.deepcopy(model), args["lora_r"], args["lora_alpha"], targets=targets)
        cases[name] = (wrap(lora_model), configure_optimizer(lora_model, 2e-4, 0.0, device_type),
                       sft_step_loss(examples, device), autocast)
    return cases


def dpo_cases(dpo_model, pairs, args):
    """DPO FFT's step on the same batch's preference pairs, with the reference's log-probabilities computed once
    (train_dpo.py's default) and computed every step by a frozen copy (its --live_reference)."""
    device, autocast = args["device"], autocast_of(args)
    dpo_model.train()
    optimizer = configure_optimizer(dpo_model, 1e-6, 0.0, device.split(":")[0])
    reference = copy.deepcopy(dpo_model).requires_grad_(False).eval()
    precomputed = reference_logps(reference, pairs, {"eval_batch_size": len(pairs), "device": device}, autocast())
    wrap = lambda m: wrap_model(m, {"compile": args["compile"]}, 1)  # noqa: E731
    return {"DPO, FFT, reference precomputed": (wrap(dpo_model), optimizer,
                                                dpo_step_loss(pairs, precomputed, device, autocast), autocast),
            "DPO, FFT, reference live": (wrap(dpo_model), optimizer, dpo_step_loss(pairs, reference, device, autocast),
                                         autocast)}


def step_figures(timings, config, batch, table):
    """The step-time ratios: ours / transformers, LoRA / FFT, DPO / SFT, beside the FLOPs that explain them."""
    step = {name: t["step"] for name, t in timings.items()}
    real_lengths, n_targets = batch.lengths.tolist(), int(batch.loss_mask.sum())
    fft_flops = train_flops(config, real_lengths, n_targets)
    lora_flops = train_flops(config, real_lengths, n_targets, lora=True)
    figures = {}
    if "SFT, FFT (transformers)" in step:
        figures["ours_over_hf_train_step"] = step["SFT, FFT (ours)"] / step["SFT, FFT (transformers)"]
        table.row("ours / transformers, training step", f"{figures['ours_over_hf_train_step']:.2f}",
                  "target <= 1.0 (CPU), <= 0.8 (GPU); ours runs the output layer only where the loss reads it")
        table.row("ours with the output layer everywhere / transformers",
                  f"{step['SFT, FFT, output layer everywhere'] / step['SFT, FFT (transformers)']:.2f}",
                  "the same work as transformers' loss: the model code alone")
    figures["lora_over_fft_step"] = step["SFT, LoRA all block Linears"] / step["SFT, FFT (ours)"]
    table.row("LoRA (all block Linears) / FFT, step", f"{figures['lora_over_fft_step']:.2f}",
              f"target <= 0.75; FLOPs {lora_flops / fft_flops:.2f} (4N vs 6N per token)")
    table.row("LoRA (attn.c_attn only) / FFT, step", f"{step['SFT, LoRA attn.c_attn'] / step['SFT, FFT (ours)']:.2f}",
              "FLOPs the same 4N: every frozen weight still passes the gradient down")
    figures["dpo_precomputed_over_sft_step"] = step["DPO, FFT, reference precomputed"] / step["SFT, FFT (ours)"]
    figures["dpo_live_over_sft_step"] = step["DPO, FFT, reference live"] / step["SFT, FFT (ours)"]
    table.row("DPO (reference precomputed) / SFT, step", f"{figures['dpo_precomputed_over_sft_step']:.2f}",
              "target <= 2.1; FLOPs 2x: chosen + rejected, one forward")
    table.row("DPO (reference live) / SFT, step", f"{figures['dpo_live_over_sft_step']:.2f}",
              "target <= 2.8; FLOPs 2.67x: + the reference's forward of both (2N per token)")
    return figures


def memory_figures(config, cases, examples, args, table):
    """Peak memory of SFT with FFT and with LoRA, each in a fresh process, and what it is made of, counted."""
    jobs = {name: (peak_memory_of_method, (config, examples, targets, args["device"], args["dtype"], args["lora_r"],
                                           args["lora_alpha"], args["compile"]))
            for name, targets in (("FFT", None), ("LoRA, all block Linears", DEFAULT_TARGETS),
                                  ("LoRA, attn.c_attn", ("attn.c_attn",)))}
    memory = peak_memory_in_fresh_processes(jobs, args["device"])
    figures = {"lora_over_fft_peak_mem": memory["LoRA, all block Linears"] / memory["FFT"]}
    table.row("LoRA (all block Linears) / FFT, peak memory", f"{figures['lora_over_fft_peak_mem']:.2f}",
              f"target <= 0.6; {how_memory_is_measured(args['device'].split(':')[0])}")
    for name, value in memory.items():
        table.row(f"  peak memory, {name}", f"{value / 2 ** 20:.0f} MiB")
    for name, case in (("FFT", cases["SFT, FFT (ours)"]), ("LoRA, all block Linears",
                                                           cases["SFT, LoRA all block Linears"])):
        model, optimizer = unwrapped(case[0]), case[1]
        weights, grads, adam = state_bytes(model, optimizer)
        activations = saved_activation_bytes(model, sft_step_loss(examples, args["device"]), autocast_of(args))
        table.row(f"  counted, {name}", f"{(weights + grads + adam + activations) / 2 ** 20:.0f} MiB",
                  f"weights {weights / 2 ** 20:.0f} + gradients {grads / 2 ** 20:.0f} + AdamW {adam / 2 ** 20:.0f}"
                  f" + saved activations {activations / 2 ** 20:.0f} MiB")
    return figures


def generation_figures(model, hf_model, config, args, table):
    """Sonnet-length prompts (32-37 tokens), the course's sampling, new_tokens per row: ours with the KV cache
    and without it (the same tokens, or an error), and transformers' generate, in turns."""
    device = args["device"]
    model.eval()
    generator = torch.Generator().manual_seed(args["seed"])
    input_ids, attention_mask = left_pad(random_prompts(args["sonnet_rows"], 32, 37, generator, config.vocab_size))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    ours = lambda n, cache: generate_ours(model, input_ids, attention_mask, n, cache, device)  # noqa: E731
    ours(8, True)  # warm-up
    if hf_model is not None:
        hf_model.eval()
        generate_hf(hf_model, input_ids, attention_mask, 8)  # warm-up
    cache_runs, hf_runs = [], []
    for _ in range(args["generate_runs"]):  # in turns
        cached, seconds = timed(lambda: ours(args["new_tokens"], True), device)
        cache_runs.append(seconds)
        if hf_model is not None:
            out, seconds = timed(lambda: generate_hf(hf_model, input_ids, attention_mask, args["new_tokens"]), device)
            if out.size(1) != input_ids.size(1) + args["new_tokens"]:
                raise RuntimeError(f"transformers generated {out.size(1) - input_ids.size(1)} tokens, not "
                                   f"{args['new_tokens']}: the two generations would not be comparable")
            hf_runs.append(seconds)
    uncached, no_cache_s = timed(lambda: ours(args["new_tokens"], False), device)
    if not torch.equal(cached, uncached):
        raise RuntimeError("the KV cache changed the generated tokens")
    return generation_rows(statistics.median(cache_runs), no_cache_s, hf_runs, args, table)


def generation_rows(cache_s, no_cache_s, hf_runs, args, table):
    figures = {"kv_cache_speedup": no_cache_s / cache_s}
    what = f"{args['sonnet_rows']} sonnets x {args['new_tokens']} new tokens"
    table.row(f"generate {what}, KV cache", f"{cache_s:.2f} s", f"median of {args['generate_runs']}")
    table.row(f"generate {what}, no cache", f"{no_cache_s:.2f} s", "the same tokens")
    table.row("KV cache speed-up", f"{figures['kv_cache_speedup']:.1f}x", "target >= 5")
    if hf_runs:
        hf_s = statistics.median(hf_runs)
        figures["ours_over_hf_generate"] = cache_s / hf_s
        table.row(f"generate {what}, transformers", f"{hf_s:.2f} s", f"median of {len(hf_runs)}, its KV cache")
        table.row("ours / transformers, generate", f"{figures['ours_over_hf_generate']:.2f}", "target <= 1.0")
    return figures


def sonnet_training_rows(sonnets, n):
    """n sonnets (the file's in turn, again from the first if it has fewer) as SFT's examples (a whole sonnet,
    every token a target: train_sft.py's sonnet_example) and as DPO's pairs (preferences.sonnet_pairs: prompt =
    the first 3 lines, chosen = the true rest). Training's rejected rest is sampled from the model (up to the
    longest true rest); here it is the next sonnet's true rest, a real one of a realistic length: a step's cost
    depends only on its rows' lengths, never on which tokens they hold."""
    chosen = [sonnets[i % len(sonnets)] for i in range(n)]
    rejected = [encode(split_prompt(sonnets[(i + 1) % len(sonnets)].text)[1]) for i in range(n)]
    return [sonnet_example(s) for s in chosen], sonnet_pairs(chosen, rejected)


def sonnet_cases(config, examples, pairs, args):
    """The sonnet steps as train_sft.py and train_dpo.py take them, {SFT, DPO} x {FFT, LoRA on all block
    Linears} (DPO: the reference's log-probabilities computed once, its default; DPO FFT with the chunked
    log-probabilities, what a 16-sonnet batch takes), and DPO FFT's step again with the plain ones:
    {name: (model, optimizer, loss_fn, autocast)}."""
    device, device_type, autocast = args["device"], args["device"].split(":")[0], autocast_of(args)
    wrap = lambda m: wrap_model(m, {"compile": args["compile"]}, 1)  # noqa: E731
    torch.manual_seed(args["seed"])
    sft_model = GPT(config).to(device).train()
    dpo_model = GPT(replace(config, dropout=DPO_DROPOUT)).to(device).train()
    reference = reference_logps(dpo_model, pairs, {"eval_batch_size": len(pairs), "device": device}, autocast())
    losses = {"SFT": sft_step_loss(examples, device), "DPO": dpo_step_loss(pairs, reference, device, autocast)}
    cases = {}
    for kind, model in (("SFT", sft_model), ("DPO", dpo_model)):
        lora_model = apply_lora(copy.deepcopy(model), args["lora_r"], args["lora_alpha"], targets=DEFAULT_TARGETS)
        for method, m, lr in (("FFT", model, 1e-5), ("LoRA", lora_model, 2e-4)):
            cases[f"sonnet {kind}, {method}"] = (wrap(m), configure_optimizer(m, lr, 0.0, device_type), losses[kind],
                                                 autocast)
    fft_model, fft_optimizer = cases["sonnet DPO, FFT"][:2]
    for path in ("chunked", "plain"):
        cases[f"sonnet DPO, FFT, {path} log-probs"] = (
            fft_model, fft_optimizer, dpo_step_loss(pairs, reference, device, autocast, path), autocast)
    del cases["sonnet DPO, FFT"]
    return cases


def sonnet_step_figures(timings, table):
    """Each sonnet step's seconds, and DPO FFT's step with our log-probabilities over the plain ones."""
    step = {name: t["step"] for name, t in timings.items()}
    step["sonnet DPO, FFT"] = step["sonnet DPO, FFT, chunked log-probs"]
    figures = {f"sonnet_{kind.lower()}_{method.lower()}_step_s": step[f"sonnet {kind}, {method}"]
               for kind in ("SFT", "DPO") for method in ("FFT", "LoRA")}
    figures["sonnet_step_time_ratio"] = step["sonnet DPO, FFT"] / step["sonnet DPO, FFT, plain log-probs"]
    table.row("sonnet DPO FFT step, chunked / plain log-probs", f"{figures['sonnet_step_time_ratio']:.2f}",
              "the output layer on the target window either way; plain keeps its (B, W, V) logits")
    return figures


def sonnet_memory_figures(config, examples, pairs, dpo_batch, args, table):
    """Peak memory of each sonnet step, and of one policy log-probability + backward on DPO's batch, chunked
    over plain (train_sft.batch_logprobs' two paths): each in a fresh process."""
    dpo_config = replace(config, dropout=DPO_DROPOUT)
    jobs = {f"sonnet_{kind}_{method}_peak_memory_bytes": (
                peak_memory_of_method, (kind_config, rows, targets, args["device"], args["dtype"], args["lora_r"],
                                        args["lora_alpha"], args["compile"], 2, kind))
            for kind, kind_config, rows in (("sft", config, examples), ("dpo", dpo_config, pairs))
            for method, targets in (("fft", None), ("lora", DEFAULT_TARGETS))}
    for path in ("chunked", "plain"):
        jobs[path] = (peak_memory_of_logprobs, (dpo_config, pairs, args["device"], args["dtype"], path))
    memory = peak_memory_in_fresh_processes(jobs, args["device"])
    chunked, plain = memory.pop("chunked"), memory.pop("plain")
    B, W = target_window(dpo_batch)[0].shape
    table.row("sonnet log-probs + backward, chunked / plain, peak memory", f"{chunked / plain:.2f}",
              f"target <= 0.30; {B} rows x {W} window positions, FFT: chunked {chunked / 2 ** 20:.0f} MiB, plain "
              f"{plain / 2 ** 20:.0f} MiB (its float32 logits alone {B * W * config.vocab_size * 4 / 2 ** 20:.0f} "
              f"MiB); growth after the model is built, {how_memory_is_measured(args['device'].split(':')[0])}")
    for name, value in memory.items():
        table.row(f"  peak memory, {name.removesuffix('_peak_memory_bytes').replace('_', ' ')} step",
                  f"{value / 2 ** 20:.0f} MiB")
    return {"sonnet_logprob_memory_ratio": chunked / plain, **memory}


def sonnet_figures(config, sonnets, args, table):
    """Sonnet steps, where every token is a target and so the output layer runs at every position: their
    seconds and peak memory for SFT and DPO, FFT and LoRA, and our log-probabilities against the plain ones."""
    config = replace(config, n_layer=args["sonnet_layers"] or config.n_layer)
    examples, pairs = sonnet_training_rows(sonnets, args["sonnet_batch"])
    timings = time_in_turns(sonnet_cases(config, examples, pairs, args), args["warmup"], args["steps"], args["device"])
    dpo_batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    print_steps(f"sonnet training steps, n_layer={config.n_layer}", timings, args,
                f"SFT batch: {describe_batch(collate(examples), 'sonnets')}; "
                f"DPO batch: {describe_batch(dpo_batch, 'rows (chosen + rejected)')}")
    figures = sonnet_step_figures(timings, table)
    figures.update(sonnet_memory_figures(config, examples, pairs, dpo_batch, args, table))
    return figures


def run(args):
    t_start = time.perf_counter()
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    quora_pairs, sonnets = read_data(args)  # the data first: a missing or malformed file fails before any model
    transformers = import_transformers()
    torch.manual_seed(args["seed"])
    config, table, results = model_config(args), Table(), {}
    print(f"bench.py: n_layer={config.n_layer}, n_embd={config.n_embd} ({args['size']}'s shape unless changed), random "
          f"weights, dtype {args['dtype']}{', torch.compile' if args['compile'] else ''}, "
          f"on {device_name(args['device'])}, torch {torch.__version__}; "
          f"{len(quora_pairs)} Quora pairs from {args['quora']}, {len(sonnets)} sonnets from "
          f"{args['sonnets']}; {machine_load()}")
    dpo_pairs = paraphrase_pairs(quora_pairs)  # chosen: the right answer; rejected: the other one
    examples = [p.chosen for p in dpo_pairs]  # = paraphrase_example(pair): what SFT trains on
    lengths = [len(e) for e in examples]
    batches = epoch_batches(lengths, {"batch_size": args["batch_size"], "seed": args["seed"]}, 0)
    results.update(padding_figures(lengths, batches, args, table))
    model, dpo_model, hf_model = load_models(config, transformers, args["device"], table)
    scoring_rate(model, examples, args, table)
    typical = median_length_batch(lengths, batches)  # every step on this batch: a typical one of train_sft's
    batch_examples, batch = [examples[i] for i in typical], collate([examples[i] for i in typical])
    cases = {**step_cases(model, hf_model, batch_examples, args),
             **dpo_cases(dpo_model, [dpo_pairs[i] for i in typical], args)}
    timings = time_in_turns(cases, args["warmup"], args["steps"], args["device"])
    print_steps("training steps", timings, args, f"batch: {describe_batch(batch, 'pairs')}")
    results.update(step_figures(timings, config, batch, table))
    results.update(memory_figures(config, cases, batch_examples, args, table))
    if args["device"].startswith("cuda"):  # FFT and LoRA at a throughput-sized batch, MFU, one epoch's seconds
        results.update(throughput(config, cases["SFT, FFT (ours)"][:2], cases["SFT, LoRA all block Linears"][:2],
                                  examples, args, autocast_of(args), table))
    del cases, dpo_model
    results.update(generation_figures(model, hf_model, config, args, table))
    del model, hf_model  # the sonnet steps build their own
    results.update(sonnet_figures(config, sonnets, args, table))
    results["device"] = device_name(args["device"])
    print(f"\nbench.py took {time.perf_counter() - t_start:.0f} s; {machine_load()}")
    if args["out"] is not None:
        write_json(args["out"], results)
        print(f"wrote {args['out']}")
    return results


# -----------------------------------------------------------------------------
# command line


def given(name, argv):
    """Whether argv sets --name (either spelling, with or without =)."""
    return any(arg.split("=")[0] in (f"--{name}", f"--{name.replace('_', '-')}") for arg in argv)


def settled(config, argv):
    """--quick's values for the flags argv does not give, and the data files from --data_dir unless given."""
    if config["quick"]:
        config.update({name: value for name, value in QUICK.items() if not given(name, argv)})
    config["quora"] = config["quora"] or config["data_dir"] / QUORA["train"]
    config["sonnets"] = config["sonnets"] or config["data_dir"] / SONNETS["train"]
    return config


def parse_args(argv):
    return settled(flags.parse(argv, SETTINGS, __doc__), argv)


def check_files(config):
    """The checks that span flags or read the disk, before any data is read or model built: --out first."""
    out = config["out"]
    if out is not None and out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name such as bench.json")
    if out is not None:
        writable_dir(out.parent, "--out")
    try:
        model_config(config)
    except ValueError as e:
        raise InputError(f"--n_head/--n_embd: {e}") from None
    check_device(config["device"])
    if not config["data_dir"].is_dir():
        raise InputError(f"--data_dir {config['data_dir']}: no such directory (it holds the course's "
                         f"{QUORA['train']} and {SONNETS['train']}, as `python -m data.download` writes them)")
    for flag, name in (("quora", QUORA["train"]), ("sonnets", SONNETS["train"])):
        if not config[flag].is_file():
            raise InputError(f"--{flag} {config[flag]}: no such file (the course's {name}; by default --data_dir's)")
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return flags.main(lambda config: run(check_files(settled(config, argv))), SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
