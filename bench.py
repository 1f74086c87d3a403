"""
What each method costs, measured side by side on this machine (after nanoGPT's bench.py).

    python bench.py --quick --out bench.json     # a few minutes on a 2-core CPU
    python bench.py --device cuda --data_dir data   # the course's files (python -m data.download), not the sample

GPT-2's shape with random weights, trained on real Quora pairs and sonnets (their padding is training's). Each
ratio compares two things measured in one run on one batch: medians of steps taken in turns (A, B, A, B, ...), so
a busy machine slows both alike; peak memory in a fresh process per method. docs/costs.md explains each figure.
"""

import copy
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

import flags
from checkpoint import PRETRAINED, from_pretrained, peak_memory_bytes, reset_peak_memory, save_pretrained
from data.batching import collate, left_pad
from data.quora import read_quora
from data.sonnets import read_sonnets, sonnet_example, split_prompt
from data.tasks import QUORA, SONNETS
from data.tokenizer import END_OF_TEXT, encode
from eval import answers_yes
from fileio import InputError, writable_dir, write_json
from flags import NON_NEGATIVE, POSITIVE, at_least, between, one_of
from lora import DEFAULT_TARGETS, apply_lora
from model import GPT, GPTConfig
from preferences import paraphrase_pairs, sonnet_pairs
from train_dpo import SETTINGS as DPO_SETTINGS, concatenated_logps, dpo_loss, scored_logps
from train_sft import SETTINGS as SFT_SETTINGS, batch_logprobs, sft_loss
from trainer import autocast_context, configure_optimizer, epoch_batches, wrap_model

QUICK = dict(warmup=1, steps=3, score_pairs=32, sonnet_rows=2, generate_runs=1, sonnet_batch=1, sonnet_layers=2)
SETTINGS = {  # each row is a flag (flags.py)
    "quick": (False, bool, None, f"fewer steps and rows, for the flags not given: {QUICK}"),
    "out": (None, Path, None, "write the figures as JSON to this file"),
    "size": ("gpt2", str, one_of(*PRETRAINED), "the model's shape (random weights): gpt2 is 124M"),
    "n_layer": (None, int, at_least(1), "change the size's number of layers"),
    "n_head": (None, int, at_least(1), "change the size's number of heads"),
    "n_embd": (None, int, at_least(1), "change the size's width"),
    "device": (flags.default_device(), str, None, "cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", str, one_of("auto", "float32", "bfloat16"), "auto: bfloat16 on a GPU with it, as training"),
    "batch_size": (8, int, at_least(1), "Quora pairs per training step: the course's batch"),
    "big_batch_size": (64, int, at_least(1), "a throughput-sized batch, measured on a GPU (MFU, epoch)"),
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
    "data_dir": (Path(__file__).resolve().parent / "data" / "samples", Path, None,
                 "the course's quora-train.csv and sonnets.txt (by default a sample of each)"),
    "quora": (None, Path, None, "labelled Quora pairs in the course's format (default: --data_dir's)"),
    "sonnets": (None, Path, None, "sonnets in the course's format (default: --data_dir's)"),
    "peak_tflops": (0.0, float, NON_NEGATIVE, "the device's peak TFLOP/s for MFU (0: measure it with a matmul)"),
    "compile": (False, bool, None, "torch.compile our model's steps, as train_sft.py --compile"),
    "threads": (0, int, NON_NEGATIVE, "CPU threads for PyTorch (0: its default, one per core)"),
    "seed": (0, int, None, "the random seed of weights, batches and prompts"),
}

PARAPHRASE_TRAIN_PAIRS = 283_003  # the course's quora-train.csv: one epoch of FFT SFT is what we time on a GPU
SFT_DROPOUT = SFT_SETTINGS["dropout"][0]  # train_sft.py's default, so steps cost what the training's cost
SFT_GRAD_CLIP = SFT_SETTINGS["grad_clip"][0]
DPO_DROPOUT = DPO_SETTINGS["dropout"][0]  # train_dpo.py's: off
DPO_BETA = 0.1  # train_dpo.py's beta for DPO (--loss_type sigmoid)
MiB = 2 ** 20
HOW_MEMORY = {"cuda": "torch.cuda.max_memory_allocated", "mps": "MPS driver memory after the steps (no peak counter)",
              "cpu": "growth of peak resident memory (VmHWM)"}
RATIOS = [  # bench.json key, numerator, denominator, and the target or the count behind it
    ("ours_over_hf_train_step", "SFT, FFT (ours)", "SFT, FFT (transformers)", "<= 1.0 CPU, <= 0.8 GPU"),
    ("lora_over_fft_step", "SFT, LoRA all block Linears", "SFT, FFT (ours)", "<= 0.75; FLOPs 4N vs 6N per token"),
    ("dpo_precomputed_over_sft_step", "DPO, FFT, reference precomputed", "SFT, FFT (ours)", "<= 2.1; FLOPs 2x"),
    ("dpo_live_over_sft_step", "DPO, FFT, reference live", "SFT, FFT (ours)", "<= 2.8; FLOPs 2.67x"),
    ("lora_over_fft_peak_mem", "LoRA all block Linears, memory", "FFT, memory", "<= 0.6"),
    ("kv_cache_speedup", "generate, no cache", "generate, KV cache", ">= 5; the same tokens"),
    ("ours_over_hf_generate", "generate, KV cache", "generate, transformers", "<= 1.0; each with its KV cache"),
    ("sonnet_step_time_ratio", "sonnet DPO, FFT", "sonnet DPO, FFT, plain log-probs", "chunked / plain"),
    ("sonnet_logprob_memory_ratio", "sonnet log-probs chunked, memory", "sonnet log-probs plain, memory", "<= 0.30"),
]


def clock(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, device):
    t0 = clock(device)
    result = fn()
    return result, clock(device) - t0


def train_step(model, optimizer, loss_fn, autocast, device, split=True):
    """train_sft.py's optimizer step -> seconds (forward, backward, optimizer), or split=False the step's (a GPU's)."""
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


def time_in_turns(cases, args, title, batches):
    """A step of each case {name: (model, optimizer, loss_fn)} in turn -> {name: median step seconds}."""
    device, autocast, rounds = args["device"], autocast_of(args), {name: [] for name in cases}
    for round_ in range(args["warmup"] + args["steps"]):
        for name, case in cases.items():
            phases = train_step(*case, autocast, device)
            step_s = train_step(*case, autocast, device, split=False) if device.startswith("cuda") else sum(phases)
            if round_ >= args["warmup"]:
                rounds[name].append((step_s, *phases))
    print(f"\n{title}, median of {args['steps']} after {args['warmup']} warm-up, in turns; {batches}")
    print(f"  {'':<40}" + "".join(f"{phase:>10}" for phase in ("step", "forward", "backward", "optimizer")))
    medians = {name: [statistics.median(t) for t in zip(*times)] for name, times in rounds.items()}
    for name, seconds in medians.items():
        print(f"  {name:<40}" + "".join(f" {s:>8.3f}s" for s in seconds))
    return {name: seconds[0] for name, seconds in medians.items()}


def peak_memory_of_method(config, rows, lora_targets, args, kind="sft"):
    """Peak memory growth of two training steps from before the model. kind "sft": Examples; "dpo": Pairs."""
    device, device_type = args["device"], args["device"].split(":")[0]
    torch.manual_seed(0)
    reset_peak_memory(device_type)  # from now, so that the peak so far is the memory in use now
    before = peak_memory_bytes(device_type)
    model, optimizer = trainable(GPT(config).to(device), args, lora_targets)
    loss_fn = sft_step_loss(rows, device)
    if kind == "dpo":
        loss_fn = dpo_step_loss(rows, reference_logps(model, rows, args), args)
    reset_peak_memory(device_type)  # the reference pass's peak is not the method's
    for _ in range(2):
        train_step(model, optimizer, loss_fn, autocast_of(args), device)
    clock(device)
    return peak_memory_bytes(device_type) - before


def peak_memory_of_logprobs(config, pairs, args, path):
    """Peak memory growth of train_sft.batch_logprobs(path=path) + backward on a DPO batch (model excluded)."""
    device, device_type = args["device"], args["device"].split(":")[0]
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    reset_peak_memory(device_type)
    before = peak_memory_bytes(device_type)
    with autocast_of(args)():
        logps = batch_logprobs(model, batch, device, path=path)
    logps.sum().backward()
    clock(device)
    return peak_memory_bytes(device_type) - before


def peak_memory(jobs, args):
    """{name + ", memory": function(*arguments)} for jobs {name: (function, arguments)}, each in a fresh process."""
    workers = 1 if args["device"].startswith("cuda") else multiprocessing.cpu_count()
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),), max_tasks_per_child=1) as pool:
        futures = {name: pool.submit(function, *arguments) for name, (function, arguments) in jobs.items()}
        memory = {f"{name}, memory": future.result() for name, future in futures.items()}
    print(f"\npeak memory ({HOW_MEMORY.get(args['device'].split(':')[0])}, a fresh process per method)")
    for name, value in memory.items():
        row(name, f"{value / MiB:.0f} MiB")
    return memory


def train_flops(config, lengths, n_targets, lora=False):
    """A step's FLOPs on real tokens: (6N, LoRA 4N) + 12 L d T per token, and 6 d V per target token. N: the weights
    of the blocks' matrices (attention 4 d^2, MLP 8 d^2 per layer), which every token meets."""
    block_weights = 12 * config.n_layer * config.n_embd ** 2
    attention = 12 * config.n_layer * config.n_embd * sum(n * n for n in lengths)
    head = 6 * config.n_embd * config.vocab_size * n_targets
    return (4 if lora else 6) * block_weights * sum(lengths) + attention + head


def padding_efficiency(lengths, batches):
    """Real tokens over computed tokens: each batch computes rows x its longest row."""
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return sum(lengths[i] for b in batches for i in b) / computed


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
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return weights, grads, sum(t.numel() * t.element_size() for t in states)


def measure_peak_flops(device, n=8192, repeats=10, dtype=torch.bfloat16):
    """The device's matmul rate (FLOP/s) on n x n matrices: the best a model's matmuls can hope for."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # warm-up
    _, seconds = timed(lambda: [a @ a for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds


def sft_step_loss(examples, device):
    """train_sft.py's step: collate, then its loss (the output layer only on the target window)."""
    return lambda model: sft_loss(model, collate(examples).to(device))[0]


def reference_logps(model, pairs, args, path="auto"):
    """train_dpo.py's reference pass over the pairs, in one batch: (chosen, rejected) log-probabilities."""
    config = {"eval_batch_size": len(pairs), "device": args["device"], "logprobs": path}
    return scored_logps(model, pairs, config, autocast_of(args)())


def dpo_step_loss(pairs, reference, args, path="auto"):
    """train_dpo.py's step. reference: log-probabilities computed once, or a frozen model (--live_reference)."""
    def loss_fn(model):
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        policy = concatenated_logps(model, chosen, rejected, args["device"], path)
        ref = reference if isinstance(reference, tuple) else reference_logps(reference, pairs, args, path)
        return dpo_loss(*policy, *(logps.to(args["device"]) for logps in ref), DPO_BETA)[0].mean()
    return loss_fn


def trainable(model, args, lora_targets=None):
    """(model, with LoRA on lora_targets if given, as training wraps it; its AdamW: the rate costs nothing)."""
    if lora_targets:
        model = apply_lora(copy.deepcopy(model), args["lora_r"], args["lora_alpha"], targets=lora_targets)
    return wrap_model(model.train(), args, 1), configure_optimizer(model, 1e-5, 0.0, args["device"].split(":")[0])


def load_models(config, device):
    """(SFT's model, DPO's, transformers' or None, a test-only package): the same weights, their dropouts."""
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        print("transformers is not installed (pip install -r requirements-test.txt): no comparisons with it")
        transformers = None
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(GPT(config), directory)
        model = from_pretrained(directory, dropout=SFT_DROPOUT).to(device)
        dpo_model = from_pretrained(directory, dropout=DPO_DROPOUT).to(device)
        hf_model = None if transformers is None else transformers.GPT2LMHeadModel.from_pretrained(
            directory, resid_pdrop=SFT_DROPOUT, embd_pdrop=SFT_DROPOUT, attn_pdrop=SFT_DROPOUT).to(device)
    return model, dpo_model, hf_model


def paraphrase_steps(model, dpo_model, hf_model, quora_pairs, args):
    """Padding and scoring; SFT's and DPO's steps on a typical batch, in turns; SFT's peak memory, measured and
    counted; on a GPU, throughput() -> (bench.json's figures, measured)."""
    pairs = paraphrase_pairs(quora_pairs)  # chosen: the right answer; rejected: the other one
    examples = [p.chosen for p in pairs]  # = paraphrase_example(pair): what SFT trains on
    lengths, device = [len(e) for e in examples], args["device"]
    batches, typical = training_batches(lengths, args["batch_size"], args)
    figures = {"padding_efficiency": padding_efficiency(lengths, batches)}
    row("padding efficiency (real / computed tokens)", f"{figures['padding_efficiency']:.3f}", "target >= 0.9")
    prompts = [examples[i % len(examples)].prompt for i in range(args["score_pairs"])]
    answers_yes(model, prompts[:8], 64, device)  # warm-up
    rate = args["score_pairs"] / timed(lambda: answers_yes(model, prompts, 64, device), device)[1]
    row("paraphrase scoring (answers_yes, batches of 64)", f"{rate:.0f} pairs/s", f"dev: {40429 / rate / 60:.1f} min")
    pairs = [pairs[i] for i in typical]  # every step on this batch: a typical one of train_sft's
    rows = [p.chosen for p in pairs]
    batch = collate(rows).to(device)
    sft, fft = sft_step_loss(rows, device), trainable(model, args)
    cases = {"SFT, FFT (ours)": (*fft, sft)}
    if hf_model is not None:  # its own loss, eager; no attention mask: right padding needs none (HF's fastest)
        ids, mask = batch.input_ids, batch.loss_mask
        hf_loss = lambda model: model(input_ids=ids, labels=ids.masked_fill(mask == 0, -100)).loss  # noqa: E731
        cases["SFT, FFT (transformers)"] = (*trainable(hf_model, {**args, "compile": False}), hf_loss)
    cases["SFT, LoRA all block Linears"] = (*trainable(model, args, DEFAULT_TARGETS), sft)
    dpo, reference = trainable(dpo_model, args), copy.deepcopy(dpo_model).requires_grad_(False).eval()
    precomputed = reference_logps(reference, pairs, args)
    cases["DPO, FFT, reference precomputed"] = (*dpo, dpo_step_loss(pairs, precomputed, args))
    cases["DPO, FFT, reference live"] = (*dpo, dpo_step_loss(pairs, reference, args))
    measured = time_in_turns(cases, args, "training steps", f"batch: {describe_batch(batch, 'pairs')}")
    methods = {"FFT": None, "LoRA all block Linears": DEFAULT_TARGETS}
    measured.update(peak_memory({name: (peak_memory_of_method, (model.config, rows, targets, args))
                                 for name, targets in methods.items()}, args))
    for name in ("SFT, FFT (ours)", "SFT, LoRA all block Linears"):
        trained, optimizer, _ = cases[name]
        trained = getattr(trained, "_orig_mod", trained)  # torch.compile's wrapper holds the model
        counted = dict(zip(("weights", "gradients", "AdamW"), state_bytes(trained, optimizer)))
        counted["saved activations"] = saved_activation_bytes(trained, sft, autocast_of(args))
        row(f"  counted, {name}", f"{sum(counted.values()) / MiB:.0f} MiB",
            " + ".join(f"{part} {n / MiB:.0f}" for part, n in counted.items()) + " MiB")
    if device.startswith("cuda"):  # a throughput-sized batch: MFU, one epoch's seconds
        figures.update(throughput(model.config, fft, examples, args))
    return figures, measured


def throughput(config, fft, examples, args):
    """A GPU's figures at a typical --big_batch_size batch: FFT SFT's MFU on real tokens, one epoch's seconds."""
    pool = [examples[i % len(examples)] for i in range(max(len(examples), args["big_batch_size"]))]
    big = [pool[i] for i in training_batches([len(e) for e in pool], args["big_batch_size"], args)[1]]
    batch = collate(big)
    step = time_in_turns({"FFT": (*fft, sft_step_loss(big, args["device"]))}, args,
                         "SFT steps at a throughput-sized batch", describe_batch(batch, "pairs"))["FFT"]
    matmul_dtype = torch.bfloat16 if isinstance(autocast_of(args)(), torch.autocast) else torch.float32
    peak = args["peak_tflops"] * 1e12 or measure_peak_flops(args["device"], dtype=matmul_dtype)
    flops = train_flops(config, batch.lengths.tolist(), int(batch.loss_mask.sum()))
    figures = {"mfu": flops / step / peak, "paraphrase_epoch_s": math.ceil(PARAPHRASE_TRAIN_PAIRS / len(big)) * step}
    source = "--peak_tflops" if args["peak_tflops"] else f"measured: a {str(matmul_dtype)[6:]} matmul"
    row("MFU, FFT SFT, on real tokens", f"{100 * figures['mfu']:.1f}%",
        f"peak {peak / 1e12:.1f} TFLOP/s ({source}); target >= 45% (H100)")
    row("one epoch of paraphrase FFT SFT", f"{figures['paraphrase_epoch_s']:.1f} s",
        f"{PARAPHRASE_TRAIN_PAIRS:,} pairs in batches like this one; target <= 25 s (H100)")
    return figures


def generation(model, hf_model, args):
    """Seconds to sample new_tokens after sonnet-length prompts (top_k off), ours with and without the cache, HF's."""
    device, n = args["device"], args["new_tokens"]
    generator = torch.Generator().manual_seed(args["seed"])
    lengths = torch.randint(32, 38, (args["sonnet_rows"],), generator=generator).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (k,), generator=generator).tolist() for k in lengths]
    ids, mask = (t.to(device) for t in left_pad(prompts))
    sampling = dict(temperature=1.2, top_p=0.9, attention_mask=mask, eos_token_id=None)
    ours = lambda k, use_cache=True: model.eval().generate(  # noqa: E731
        ids, k, use_cache=use_cache, generator=torch.Generator(device=device).manual_seed(0), **sampling)
    generate = {"generate, KV cache": ours}
    if hf_model is not None:  # every row writing exactly k tokens (no end-of-text stop)
        generate["generate, transformers"] = lambda k: hf_model.eval().generate(
            ids, do_sample=True, top_k=0, max_new_tokens=k, pad_token_id=END_OF_TEXT, **sampling)
    for fn in generate.values():
        fn(8)  # warm-up
    runs = [{name: timed(lambda: fn(n), device) for name, fn in generate.items()}  # in turns
            for _ in range(args["generate_runs"])]
    if len({tokens.shape for tokens, _ in runs[-1].values()}) > 1:
        raise RuntimeError("transformers generated another number of tokens: the generations are not comparable")
    uncached, no_cache_s = timed(lambda: ours(n, use_cache=False), device)
    if not torch.equal(runs[-1]["generate, KV cache"][0], uncached):
        raise RuntimeError("the KV cache changed the generated tokens")
    measured = {"generate, no cache": no_cache_s,
                **{name: statistics.median(run[name][1] for run in runs) for name in generate}}
    print(f"\n{args['sonnet_rows']} sonnets x {n} new tokens, median of {args['generate_runs']} (no cache: one)")
    for name, value in measured.items():
        row(name, f"{value:.2f} s")
    return measured


def sonnet_training_rows(sonnets, n):
    """n sonnets (cycled) as SFT's examples and DPO's pairs (rejected: the next sonnet's rest, of a like length)."""
    chosen = [sonnets[i % len(sonnets)] for i in range(n)]
    rejected = [encode(split_prompt(sonnets[(i + 1) % len(sonnets)].text)[1]) for i in range(n)]
    return [sonnet_example(s) for s in chosen], sonnet_pairs(chosen, rejected)


def sonnet_steps(config, sonnets, args):
    """{SFT, DPO} x {FFT, LoRA} sonnet steps and DPO FFT's plain log-probabilities: seconds and peak memory."""
    config = replace(config, n_layer=args["sonnet_layers"] or config.n_layer)
    dpo_config = replace(config, dropout=DPO_DROPOUT)
    examples, pairs = sonnet_training_rows(sonnets, args["sonnet_batch"])
    torch.manual_seed(args["seed"])
    sft_model, dpo_model = GPT(config).to(args["device"]), GPT(dpo_config).to(args["device"])
    sft, reference = sft_step_loss(examples, args["device"]), reference_logps(dpo_model, pairs, args)
    dpo = {path: dpo_step_loss(pairs, reference, args, path) for path in ("auto", "chunked", "plain")}
    dpo_fft = trainable(dpo_model, args)
    cases = {"sonnet SFT, FFT": (*trainable(sft_model, args), sft),
             "sonnet SFT, LoRA": (*trainable(sft_model, args, DEFAULT_TARGETS), sft),
             "sonnet DPO, FFT": (*dpo_fft, dpo["chunked"]),
             "sonnet DPO, FFT, plain log-probs": (*dpo_fft, dpo["plain"]),
             "sonnet DPO, LoRA": (*trainable(dpo_model, args, DEFAULT_TARGETS), dpo["auto"])}
    dpo_batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    measured = time_in_turns(cases, args, f"sonnet training steps, n_layer={config.n_layer}",
                             f"SFT batch: {describe_batch(collate(examples), 'sonnets')}; "
                             f"DPO batch: {describe_batch(dpo_batch, 'rows (chosen + rejected)')}")
    jobs = {f"sonnet {kind}, {method}": (peak_memory_of_method, (kind_config, rows, targets, args, kind.lower()))
            for kind, kind_config, rows in (("SFT", config, examples), ("DPO", dpo_config, pairs))
            for method, targets in (("FFT", None), ("LoRA", DEFAULT_TARGETS))}
    for path in ("chunked", "plain"):
        jobs[f"sonnet log-probs {path}"] = (peak_memory_of_logprobs, (dpo_config, pairs, args, path))
    measured.update(peak_memory(jobs, args))
    return measured


def model_config(args):
    shape = {k: args[k] for k in ("n_layer", "n_head", "n_embd") if args[k] is not None}
    return GPTConfig(**{**PRETRAINED[args["size"]], **shape}, dropout=SFT_DROPOUT)


def autocast_of(args):
    """A fresh autocast context at each call, as train_sft.py's --dtype makes it."""
    return lambda: autocast_context(args, args["device"].split(":")[0])


def training_batches(lengths, batch_size, args):
    """train_sft's batches of one epoch (similar lengths together), and the one of median padded length."""
    batches = epoch_batches(lengths, {"batch_size": batch_size, "seed": args["seed"]}, 0)
    return batches, sorted(batches, key=lambda b: (max(lengths[i] for i in b), len(b)))[len(batches) // 2]


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((f" ({line.split(':', 1)[1].strip()})" for line in cpuinfo if line.startswith("model name")), "")
    return f"{device}{model}, {torch.get_num_threads()} thread(s)"


def row(what, value, note=""):
    print(f"  {what:<66} {value:>10}  {note}", flush=True)


def describe_batch(batch, rows):
    return (f"{batch.input_ids.size(0)} {rows} x {batch.input_ids.size(1)} positions, {int(batch.lengths.sum())} "
            f"real tokens, {int(batch.loss_mask.sum())} targets")


def run(args):
    """Every measurement in turn, printed as measured; returns bench.json's figures and writes them to --out."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    quora_pairs = read_quora(args["quora"])  # the data first: a malformed file fails before any model is built
    if not quora_pairs or any(p.label is None for p in quora_pairs):
        raise InputError(f"--quora {args['quora']}: needs labelled pairs (the is_duplicate column)")
    sonnets = read_sonnets(args["sonnets"])
    for sonnet in sonnets:
        try:
            split_prompt(sonnet.text)  # DPO's prompt is the first 3 lines: a sonnet needs more
        except ValueError as e:
            raise InputError(f"--sonnets {args['sonnets']}: sonnet {sonnet.number}: {e}") from None
    torch.manual_seed(args["seed"])
    config, device = model_config(args), args["device"]
    compiled = ", torch.compile" if args["compile"] else ""
    print(f"bench.py: n_layer={config.n_layer}, n_embd={config.n_embd}, random weights, dtype {args['dtype']}{compiled}"
          f", on {device_name(device)}, torch {torch.__version__}; {len(quora_pairs)} Quora pairs from "
          f"{args['quora']}, {len(sonnets)} sonnets from {args['sonnets']}")
    model, dpo_model, hf_model = load_models(config, device)
    results, measured = paraphrase_steps(model, dpo_model, hf_model, quora_pairs, args)
    del dpo_model
    measured.update(generation(model, hf_model, args))
    del model, hf_model  # the sonnet steps build their own
    measured.update(sonnet_steps(config, sonnets, args))
    print("\nratios: target, or the count that explains it")
    for key, numerator, denominator, note in RATIOS:
        if numerator in measured and denominator in measured:
            results[key] = measured[numerator] / measured[denominator]
            row(f"{numerator} / {denominator}", f"{results[key]:.2f}", note)
    for name in (f"sonnet {kind}, {method}" for kind in ("SFT", "DPO") for method in ("FFT", "LoRA")):
        key = name.lower().replace(",", "").replace(" ", "_")  # sonnet_sft_fft for "sonnet SFT, FFT"
        results[f"{key}_step_s"], results[f"{key}_peak_memory_bytes"] = measured[name], measured[f"{name}, memory"]
    results["device"] = device_name(device)
    if args["out"] is not None:
        write_json(args["out"], results)
    return results


def settled(args, argv):
    """--quick's values for the flags argv does not give, and the data files from --data_dir unless given."""
    given = {arg.split("=")[0][2:].replace("-", "_") for arg in argv if arg.startswith("--")}
    if args["quick"]:
        args.update({name: value for name, value in QUICK.items() if name not in given})
    args["quora"] = args["quora"] or args["data_dir"] / QUORA["train"]
    args["sonnets"] = args["sonnets"] or args["data_dir"] / SONNETS["train"]
    return args


def check_files(args):
    """The checks that span flags or look at the disk, before any data is read or model built: --out first."""
    if args["out"] is not None and args["out"].is_dir():
        raise InputError(f"--out {args['out']}: is a directory; give a file name such as bench.json")
    if args["out"] is not None:
        writable_dir(args["out"].parent, "--out")
    try:
        model_config(args)
    except ValueError as e:
        raise InputError(f"--n_head/--n_embd: {e}") from None
    flags.check_device(args["device"])
    for flag, exists, what in (("data_dir", Path.is_dir, "directory"), ("quora", Path.is_file, "file"),
                               ("sonnets", Path.is_file, "file")):
        if not exists(args[flag]):
            raise InputError(f"--{flag} {args[flag]}: no such {what} (python -m data.download writes them)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return flags.main(lambda args: run(check_files(settled(args, argv))), SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
