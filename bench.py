"""
What each method costs, measured side by side on this machine (after nanoGPT's bench.py).

    python bench.py --quick --out bench.json     # a few minutes on a 2-core CPU
    python bench.py                              # more steps, 12 sonnets at once, 256 pairs scored
    python bench.py --device cuda --batch_size 64

GPT-2 124M's shape with random weights (nothing to download: a step costs the same whatever the values),
trained on real Quora examples (their lengths, hence their padding, are what training sees: --quora).
Every ratio compares two things measured in the same run on the same batch and dtype, after warm-up:
the median of several steps, taken in turns (A, B, C, A, B, C, ...) so that a machine busy with something
else slows all of them alike, with the device synchronised around every timed phase.

Where the time goes, in FLOPs per token (N = the weights of the blocks' matrices, 85M at 124M's shape;
d = width, V = vocabulary, L = layers, T = sequence length):
    forward 2N, backward 4N (2N for the input gradient, 2N for the weight gradient)
    full fine-tuning (FFT)  6N + 12 L d T                                    (Kaplan et al. 2020, PaLM app. B)
    LoRA                    4N + 12 L d T: a frozen weight needs no weight gradient, and no AdamW state
    output layer            6 d V per token where a loss reads it (once per Quora pair), not per position
    DPO                     policy on chosen + rejected (2x the rows of SFT) + reference forward (2N each)
    generation, KV cache    2N per new token; without the cache every step recomputes the whole prefix
"""

import argparse
import copy
import math
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.batching import collate, left_pad
from data.quora import read_quora
from eval import answers_yes, check_device
from fileio import InputError, writable_dir, write_json
from lora import DEFAULT_TARGETS, apply_lora
from model import END_OF_TEXT, GPT, PRETRAINED, GPTConfig, default_device
from train_dpo import SETTINGS as DPO_SETTINGS, concatenated_logps, dpo_loss, paraphrase_pairs, reference_logps
from train_sft import SETTINGS as SFT_SETTINGS, sft_loss
from trainer import (autocast_context, configure_optimizer, epoch_batches, peak_memory_bytes, reset_peak_memory,
                     wrap_model)

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# settings (each is also a flag: --name value; --quick swaps in QUICK for the ones not given)
size = "gpt2"  # the model's shape: gpt2 (124M), gpt2-medium, ...; random weights
device = default_device()
dtype = "auto"  # as train_sft.py: auto = bfloat16 autocast on a GPU that has it, else float32
batch_size = 8  # Quora pairs per training step: the course's batch
big_batch_size = 64  # a throughput-sized batch, measured too on a GPU (FFT, LoRA, MFU, epoch time)
warmup = 2  # untimed rounds first (allocations, AdamW's state, kernel selection)
steps = 7  # timed rounds; each figure is the median
lora_r, lora_alpha = 8, 16.0
score_pairs = 256  # paraphrase prompts scored (eval.answers_yes)
sonnet_rows = 12  # sonnets generated at once
new_tokens = 128  # tokens generated per sonnet (the course's)
generate_runs = 3  # timed generations with the cache (median); the slow uncached one runs once
quora = ROOT / "data" / "quora-train.csv"  # labelled Quora pairs; without it, the course's 30-pair sample
if not quora.exists():
    quora = ROOT.parent / "shared" / "data" / "quora_samples" / "quora-train-30.csv"
peak_tflops = 0.0  # the device's peak rate for MFU (GPU only); 0 = measure it with a large matmul
compile = False  # torch.compile our model's steps, as train_sft.py --compile does (transformers' stay eager)
threads = 0  # CPU threads for PyTorch; 0 = its default (one per core)
seed = 0
QUICK = dict(warmup=1, steps=3, score_pairs=32, sonnet_rows=2, generate_runs=1)

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


def dpo_step_loss(pairs, reference, device, autocast):
    """train_dpo.py's step on a batch of preference pairs: one forward of chosen + rejected (concatenated_logps)
    and the DPO loss. reference: a frozen model, whose log-probabilities are computed every step as
    --live_reference does (train_dpo.reference_logps), or (chosen, rejected) log-probabilities computed once."""
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]

    def loss_fn(model):
        policy_chosen, policy_rejected = concatenated_logps(model, chosen, rejected, device)
        if isinstance(reference, tuple):
            ref_chosen, ref_rejected = reference
        else:
            ref_chosen, ref_rejected = reference_logps(reference, pairs, {"eval_batch_size": len(pairs),
                                                                          "device": device}, autocast())
        losses, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen.to(device), ref_rejected.to(device),
                                DPO_BETA)
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


def peak_memory_of_method(config, examples, lora_targets, device, dtype, lora_r, lora_alpha, compile=False,
                          n_steps=2):
    """Peak memory of training steps. GPU: the most PyTorch allocated (torch.cuda.max_memory_allocated).
    CPU: the process's peak resident memory (Linux VmHWM, reset after the model is built, so building's
    transients are not counted) minus its resident memory before the model existed. Either way weights,
    gradients, AdamW state, activations and every phase's temporaries are in it."""
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    before = {"cuda": torch.cuda.memory_allocated, "mps": torch.mps.driver_allocated_memory}.get(
        device_type, resident_bytes)()
    model = GPT(config).to(device).train()
    if lora_targets:
        apply_lora(model, lora_r, lora_alpha, targets=lora_targets)
    optimizer = configure_optimizer(model, 1e-5, 0.0, device_type)
    autocast = lambda: autocast_context({"dtype": dtype}, device_type)  # noqa: E731
    step_model = wrap_model(model, {"compile": compile}, 1)
    reset_peak_memory(device_type)
    for _ in range(n_steps):
        train_step(step_model, optimizer, sft_step_loss(examples, device), autocast, device)
    synchronize(device)
    return peak_memory_bytes(device_type) - before


def _memory_child(queue, args):
    try:
        queue.put(peak_memory_of_method(*args))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        queue.put(e)


def peak_memory_in_fresh_processes(jobs, parallel):
    """{name: peak_memory_of_method(*args)} for jobs {name: args}, each in a fresh (spawned) process, so no
    method's memory counts another's. parallel: all at once (CPU: each process has its own peak)."""
    context = multiprocessing.get_context("spawn")
    results, running = {}, []
    for name, args in jobs.items():
        queue = context.Queue()
        process = context.Process(target=_memory_child, args=(queue, args))
        process.start()
        running.append((name, queue, process))
        if not parallel:
            results[name] = child_result(name, queue, process)
    for name, queue, process in running:
        if name not in results:
            results[name] = child_result(name, queue, process)
    return results


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
    device = args.device
    pool = [examples[i % len(examples)] for i in range(max(len(examples), args.big_batch_size))]
    lengths = [len(e) for e in pool]
    big = [pool[i] for i in median_length_batch(lengths, epoch_batches(lengths, {"batch_size": args.big_batch_size,
                                                                                 "seed": args.seed}, 0))]
    step = time_in_turns({"FFT": (*fft, sft_step_loss(big, device), autocast),
                          "LoRA": (*lora, sft_step_loss(big, device), autocast)}, args.warmup, args.steps, device)
    memory = peak_memory_in_fresh_processes(
        {name: (config, big, targets, device, args.dtype, args.lora_r, args.lora_alpha, args.compile)
         for name, targets in (("FFT", None), ("LoRA", DEFAULT_TARGETS))}, parallel=not device.startswith("cuda"))
    table.row(f"LoRA / FFT at a batch of {len(big)}, step", f"{step['LoRA']['step'] / step['FFT']['step']:.2f}",
              f"FFT {step['FFT']['step'] * 1e3:.1f} ms, LoRA {step['LoRA']['step'] * 1e3:.1f} ms")
    table.row(f"LoRA / FFT at a batch of {len(big)}, peak memory", f"{memory['LoRA'] / memory['FFT']:.2f}",
              f"FFT {memory['FFT'] / 2 ** 20:.0f} MiB, LoRA {memory['LoRA'] / 2 ** 20:.0f} MiB")
    bf16 = isinstance(autocast(), torch.autocast)
    peak = args.peak_tflops * 1e12 or measure_peak_flops(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    batch = collate(big)
    flops = train_flops(config, batch.lengths.tolist(), int(batch.loss_mask.sum()))
    figures = {"mfu": flops / step["FFT"]["step"] / peak,
               "paraphrase_epoch_s": math.ceil(PARAPHRASE_TRAIN_PAIRS / len(big)) * step["FFT"]["step"]}
    source = "--peak_tflops" if args.peak_tflops else f"measured: {'bf16' if bf16 else 'fp32'} matmul"
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
    shape = {**PRETRAINED[args.size], **{k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd")
                                         if getattr(args, k) is not None}}
    return GPTConfig(**shape, dropout=SFT_DROPOUT)


class Table:
    """Rows printed as they are measured: what, value, a note (the target, or the count that explains it)."""

    def row(self, what, value, note=""):
        print(f"  {what:<52} {value:>12}  {note}", flush=True)


def run(args):
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the data first: a missing or malformed file fails before any model is built
    pairs = read_quora(args.quora)
    if not pairs or any(p.label is None for p in pairs):
        raise InputError(f"--quora {args.quora}: needs labelled pairs (the is_duplicate column)")
    dpo_pairs = paraphrase_pairs(pairs)  # chosen: the right answer; rejected: the other one
    examples = [p.chosen for p in dpo_pairs]  # = paraphrase_example(pair): what SFT trains on
    transformers = import_transformers()
    device, device_type = args.device, args.device.split(":")[0]
    on_gpu = device_type == "cuda"
    autocast = lambda: autocast_context({"dtype": args.dtype}, device_type)  # noqa: E731
    torch.manual_seed(args.seed)
    config = model_config(args)
    table, results = Table(), {}
    print(f"bench.py: n_layer={config.n_layer}, n_embd={config.n_embd} ({args.size}'s shape unless changed), random "
          f"weights, dtype {args.dtype}{', torch.compile' if args.compile else ''}, on {device_name(device)}, "
          f"torch {torch.__version__}; {len(pairs)} Quora pairs from {args.quora}; {machine_load()}")

    # 1. padding: the batches train_sft.py builds (batch_indices: shuffled pools, sorted by length)
    lengths = [len(e) for e in examples]
    batches = epoch_batches(lengths, {"batch_size": args.batch_size, "seed": args.seed}, 0)
    in_file_order = [list(range(i, min(i + args.batch_size, len(lengths))))
                     for i in range(0, len(lengths), args.batch_size)]
    results["padding_efficiency"] = padding_efficiency(lengths, batches)
    table.row("padding efficiency (real / computed tokens)", f"{results['padding_efficiency']:.3f}",
              f"target >= 0.9; train_sft's batches of {args.batch_size} (unsorted, in file order: "
              f"{padding_efficiency(lengths, in_file_order):.3f})")

    # 2. loading and scoring: what evaluation costs
    with tempfile.TemporaryDirectory() as directory:
        GPT(config).save_pretrained(directory)
        model, load_s = timed(lambda: GPT.from_pretrained(directory, dropout=SFT_DROPOUT).to(device), device)
        dpo_model = GPT.from_pretrained(directory, dropout=DPO_DROPOUT).to(device)  # DPO trains without dropout
        hf_model = None
        if transformers is not None:  # the same weights, the same dropout
            p = SFT_DROPOUT
            hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory, resid_pdrop=p, embd_pdrop=p,
                                                                    attn_pdrop=p).to(device)
    table.row("load (GPT.from_pretrained)", f"{load_s:.2f} s", f"{model.num_parameters() / 1e6:.0f}M parameters")
    prompts = [examples[i % len(examples)].prompt for i in range(args.score_pairs)]
    answers_yes(model, prompts[:8], 64, device)  # warm-up
    _, score_s = timed(lambda: answers_yes(model, prompts, 64, device), device)
    table.row("paraphrase scoring (eval.answers_yes, batches of 64)", f"{args.score_pairs / score_s:.0f} pairs/s",
              f"the 40,429 dev pairs: {40429 / (args.score_pairs / score_s) / 60:.1f} min")

    # 3. training steps, in turns, on the same batch: a typical one of train_sft's
    chosen_idx = median_length_batch(lengths, batches)
    batch_examples, batch_pairs = [examples[i] for i in chosen_idx], [dpo_pairs[i] for i in chosen_idx]
    batch = collate(batch_examples).to(device)
    real_lengths = batch.lengths.tolist()
    n_targets = int(batch.loss_mask.sum())
    model.train()
    optimizer = configure_optimizer(model, 1e-5, 0.0, device_type)
    wrap = lambda m: wrap_model(m, {"compile": args.compile}, 1)  # noqa: E731 - torch.compile as train_sft's --compile
    cases = {"SFT, FFT (ours)": (wrap(model), optimizer, sft_step_loss(batch_examples, device), autocast),
             "SFT, FFT, output layer everywhere": (model, optimizer, full_logits_loss(batch), autocast)}
    if hf_model is not None:
        hf_model.train()
        cases["SFT, FFT (transformers)"] = (hf_model, configure_optimizer(hf_model, 1e-5, 0.0, device_type),
                                            hf_loss(batch), autocast)
    lora_models = {}
    for name, targets in (("SFT, LoRA all block Linears", DEFAULT_TARGETS),
                          ("SFT, LoRA attn.c_attn", ("attn.c_attn",))):
        lora_models[name] = apply_lora(copy.deepcopy(model), args.lora_r, args.lora_alpha, targets=targets)
        cases[name] = (wrap(lora_models[name]), configure_optimizer(lora_models[name], 2e-4, 0.0, device_type),
                       sft_step_loss(batch_examples, device), autocast)
    dpo_model.train()
    dpo_optimizer = configure_optimizer(dpo_model, 1e-6, 0.0, device_type)
    reference = copy.deepcopy(dpo_model).requires_grad_(False).eval()  # as train_dpo.py's --live_reference
    precomputed = reference_logps(reference, batch_pairs, {"eval_batch_size": len(batch_pairs), "device": device},
                                  autocast())
    cases["DPO, FFT, reference precomputed"] = (wrap(dpo_model), dpo_optimizer,
                                                dpo_step_loss(batch_pairs, precomputed, device, autocast), autocast)
    cases["DPO, FFT, reference live"] = (wrap(dpo_model), dpo_optimizer,
                                         dpo_step_loss(batch_pairs, reference, device, autocast), autocast)
    timings = time_in_turns(cases, args.warmup, args.steps, device)
    del reference

    print(f"\ntraining steps, median of {args.steps} after {args.warmup} warm-up, in turns; batch: {len(real_lengths)} "
          f"pairs x {batch.input_ids.size(1)} positions, {sum(real_lengths)} real tokens, {n_targets} targets")
    print(f"  {'':<40} {'step':>8} {'forward':>8} {'backward':>8} {'optimizer':>9}")
    for name, t in timings.items():
        print(f"  {name:<40} {t['step']:>7.3f}s {t['forward']:>7.3f}s {t['backward']:>7.3f}s {t['optimizer']:>8.3f}s")
    print()
    step = {name: t["step"] for name, t in timings.items()}
    fft_flops = train_flops(config, real_lengths, n_targets)
    lora_flops = train_flops(config, real_lengths, n_targets, lora=True)
    if hf_model is not None:
        results["ours_over_hf_train_step"] = step["SFT, FFT (ours)"] / step["SFT, FFT (transformers)"]
        table.row("ours / transformers, training step", f"{results['ours_over_hf_train_step']:.2f}",
                  "target <= 1.0 (CPU), <= 0.8 (GPU); ours runs the output layer only where the loss reads it")
        table.row("ours with the output layer everywhere / transformers",
                  f"{step['SFT, FFT, output layer everywhere'] / step['SFT, FFT (transformers)']:.2f}",
                  "the same work as transformers' loss: the model code alone")
    results["lora_over_fft_step"] = step["SFT, LoRA all block Linears"] / step["SFT, FFT (ours)"]
    table.row("LoRA (all block Linears) / FFT, step", f"{results['lora_over_fft_step']:.2f}",
              f"target <= 0.75; FLOPs {lora_flops / fft_flops:.2f} (4N vs 6N per token)")
    table.row("LoRA (attn.c_attn only) / FFT, step",
              f"{step['SFT, LoRA attn.c_attn'] / step['SFT, FFT (ours)']:.2f}",
              "FLOPs the same 4N: every frozen weight still passes the gradient down")
    results["dpo_precomputed_over_sft_step"] = step["DPO, FFT, reference precomputed"] / step["SFT, FFT (ours)"]
    results["dpo_live_over_sft_step"] = step["DPO, FFT, reference live"] / step["SFT, FFT (ours)"]
    table.row("DPO (reference precomputed) / SFT, step", f"{results['dpo_precomputed_over_sft_step']:.2f}",
              "target <= 2.1; FLOPs 2x: chosen + rejected, one forward")
    table.row("DPO (reference live) / SFT, step", f"{results['dpo_live_over_sft_step']:.2f}",
              "target <= 2.8; FLOPs 2.67x: + the reference's forward of both (2N per token)")

    # 4. peak memory of each method, each in a fresh process
    jobs = {name: (config, batch_examples, targets, device, args.dtype, args.lora_r, args.lora_alpha, args.compile)
            for name, targets in (("FFT", None), ("LoRA, all block Linears", DEFAULT_TARGETS),
                                  ("LoRA, attn.c_attn", ("attn.c_attn",)))}
    memory = peak_memory_in_fresh_processes(jobs, parallel=not on_gpu)
    results["lora_over_fft_peak_mem"] = memory["LoRA, all block Linears"] / memory["FFT"]
    how = {"cuda": "torch.cuda.max_memory_allocated", "mps": "MPS driver memory after the steps (no peak counter)"
           }.get(device_type, "growth of peak resident memory (VmHWM)") + ", a fresh process per method"
    table.row("LoRA (all block Linears) / FFT, peak memory", f"{results['lora_over_fft_peak_mem']:.2f}",
              f"target <= 0.6; {how}")
    for name, value in memory.items():
        table.row(f"  peak memory, {name}", f"{value / 2 ** 20:.0f} MiB")
    for name, (m, opt) in (("FFT", (model, optimizer)), ("LoRA, all block Linears", (
            lora_models["SFT, LoRA all block Linears"], cases["SFT, LoRA all block Linears"][1]))):
        weights, grads, adam = state_bytes(m, opt)
        activations = saved_activation_bytes(m, sft_step_loss(batch_examples, device), autocast)
        table.row(f"  counted, {name}", f"{(weights + grads + adam + activations) / 2 ** 20:.0f} MiB",
                  f"weights {weights / 2 ** 20:.0f} + gradients {grads / 2 ** 20:.0f} + AdamW {adam / 2 ** 20:.0f}"
                  f" + saved activations {activations / 2 ** 20:.0f} MiB")

    # 5. on a GPU: FFT and LoRA at a throughput-sized batch, MFU, and one epoch of paraphrase FFT SFT
    if on_gpu:
        results.update(throughput(config, cases["SFT, FFT (ours)"][:2], cases["SFT, LoRA all block Linears"][:2],
                                  examples, args, autocast, table))
    del cases, optimizer, dpo_model, dpo_optimizer

    # 6. generation: sonnet-length prompts (32-37 tokens), the course's sampling, new_tokens per row
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    input_ids, attention_mask = left_pad(random_prompts(args.sonnet_rows, 32, 37, generator, config.vocab_size))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    generate_ours(model, input_ids, attention_mask, 8, True, device)  # warm-up
    if hf_model is not None:
        hf_model.eval()
        generate_hf(hf_model, input_ids, attention_mask, 8)  # warm-up
    cache_runs, hf_runs = [], []
    for _ in range(args.generate_runs):  # in turns
        cached, seconds = timed(lambda: generate_ours(model, input_ids, attention_mask, args.new_tokens, True,
                                                      device), device)
        cache_runs.append(seconds)
        if hf_model is not None:
            out, seconds = timed(lambda: generate_hf(hf_model, input_ids, attention_mask, args.new_tokens), device)
            if out.size(1) != input_ids.size(1) + args.new_tokens:
                raise RuntimeError(f"transformers generated {out.size(1) - input_ids.size(1)} tokens, not "
                                   f"{args.new_tokens}: the two generations would not be comparable")
            hf_runs.append(seconds)
    uncached, no_cache_s = timed(lambda: generate_ours(model, input_ids, attention_mask, args.new_tokens, False,
                                                       device), device)
    if not torch.equal(cached, uncached):
        raise RuntimeError("the KV cache changed the generated tokens")
    cache_s = statistics.median(cache_runs)
    results["kv_cache_speedup"] = no_cache_s / cache_s
    what = f"{args.sonnet_rows} sonnets x {args.new_tokens} new tokens"
    table.row(f"generate {what}, KV cache", f"{cache_s:.2f} s", f"median of {len(cache_runs)}")
    table.row(f"generate {what}, no cache", f"{no_cache_s:.2f} s", "the same tokens")
    table.row("KV cache speed-up", f"{results['kv_cache_speedup']:.1f}x", "target >= 5")
    if hf_runs:
        hf_s = statistics.median(hf_runs)
        results["ours_over_hf_generate"] = cache_s / hf_s
        table.row(f"generate {what}, transformers", f"{hf_s:.2f} s", f"median of {len(hf_runs)}, its KV cache")
        table.row("ours / transformers, generate", f"{results['ours_over_hf_generate']:.2f}", "target <= 1.0")

    results["device"] = device_name(device)
    print(f"\nbench.py took {time.perf_counter() - t_start:.0f} s; {machine_load()}")
    if args.out is not None:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


# -----------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        sys.exit(f"error: {message}")


def parse_args(argv=None):
    parser = Parser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer steps and rows: {QUICK}")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON to this file")
    parser.add_argument("--size", choices=list(PRETRAINED), default=size)
    for name in ("n_layer", "n_head", "n_embd"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"change the size's {name}")
    parser.add_argument("--device", default=device)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=dtype)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=batch_size)
    parser.add_argument("--big_batch_size", "--big-batch-size", type=int, default=big_batch_size)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lora_r", "--lora-r", type=int, default=lora_r)
    parser.add_argument("--lora_alpha", "--lora-alpha", type=float, default=lora_alpha)
    parser.add_argument("--score_pairs", "--score-pairs", type=int, default=score_pairs)
    parser.add_argument("--sonnet_rows", "--sonnet-rows", type=int, default=sonnet_rows)
    parser.add_argument("--new_tokens", "--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--generate_runs", "--generate-runs", type=int, default=generate_runs)
    parser.add_argument("--quora", type=Path, default=quora, help="labelled Quora pairs (the course's format)")
    parser.add_argument("--peak_tflops", "--peak-tflops", type=float, default=peak_tflops)
    parser.add_argument("--compile", action="store_true", default=compile,
                        help="torch.compile our model, as train_sft.py --compile")
    parser.add_argument("--threads", type=int, default=threads, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args(argv)
    if args.quick:  # QUICK's values, except for flags given explicitly
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def check_args(args):
    """Every value, checked before any data is read or model built."""
    for flag in ("batch_size", "big_batch_size", "steps", "lora_r", "score_pairs", "sonnet_rows", "new_tokens",
                 "generate_runs"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    for flag in ("warmup", "threads"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be 0 or more")
    if not (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)):
        raise InputError(f"--lora_alpha {args.lora_alpha}: must be a positive number")
    if not (args.peak_tflops >= 0 and math.isfinite(args.peak_tflops)):
        raise InputError(f"--peak_tflops {args.peak_tflops}: must be 0 (measure it) or the device's peak TFLOP/s")
    if 37 + args.new_tokens > GPTConfig().block_size:
        raise InputError(f"--new_tokens {args.new_tokens}: a sonnet prompt (up to 37 tokens) plus the new tokens "
                         f"must fit GPT-2's 1024 positions")
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} {getattr(args, name)}: must be at least 1")
    try:
        model_config(args)
    except ValueError as e:
        raise InputError(f"--n_head/--n_embd: {e}") from None
    check_device(args.device)
    if not args.quora.is_file():
        raise InputError(f"--quora {args.quora}: no such file (labelled Quora pairs: data/quora-train.csv after "
                         f"`python -m data.download`, or the course's quora-train-30.csv sample)")
    if args.out is not None:
        if args.out.is_dir():
            raise InputError(f"--out {args.out}: is a directory; give a file name such as bench.json")
        writable_dir(args.out.parent, "--out")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
