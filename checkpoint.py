"""
The run folder: everything a training run writes and every script reads back (after nanochat's checkpoint manager).

    out/sft-paraphrase-fft/
        last/               the final epoch's model (always)
        best/               the best dev epoch's model (the course's practice; a study keeps only last/)
        checkpoint.pt       resumable state while the run is unfinished (deleted when it ends unless --keep_checkpoints)
        results.json        scores, costs and the full config (trainer.run_results)
        dev_predictions.json, best_dev_predictions.json     the final and the best epoch's dev predictions

A model folder (last/, best/) is one of two layouts:
- FFT: the Hugging Face hub's GPT-2 layout, config.json + model.safetensors (save_pretrained);
- LoRA: adapter.safetensors + adapter_config.json, whose "base_model_name_or_path" names the model it adapts
  (a GPT-2 name, a hub folder, or another adapter folder: SFT LoRA -> DPO LoRA stacks).
"""

import os
import random
import re
import resource
import sys
from contextlib import suppress
from pathlib import Path

import torch

from fileio import InputError, atomic_open, download, read_json, read_safetensors, write_json, write_safetensors
from lora import load_lora, lora_layers, lora_state_dict, merged_model, save_lora
from model import END_OF_TEXT, GPT, PRETRAINED, GPTConfig

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
CHECKPOINT = "checkpoint.pt"


# -----------------------------------------------------------------------------
# the hub's GPT-2 layout (config.json + model.safetensors): OpenAI's weights, and what FFT runs write

HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
# OpenAI's code stores these four as "Conv1D" weights, (in, out); nn.Linear keeps (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_name(name_or_dir):
    """The OpenAI size that `name_or_dir` names (gpt2, openai-community/gpt2, ...), or None; a folder wins."""
    name = str(name_or_dir).removeprefix("openai-community/")
    return name if name in PRETRAINED and not Path(name_or_dir).is_dir() else None


def check_source(name_or_dir, flag=""):
    """What a script was pointed at must be a GPT-2 name or an existing directory: checked before any work."""
    if gpt2_name(name_or_dir) is None and not Path(name_or_dir).is_dir():
        raise InputError(f"{flag} {str(name_or_dir)!r}: neither a GPT-2 name ({', '.join(PRETRAINED)}) "
                         f"nor an existing directory".lstrip())


def from_pretrained(name_or_dir, dropout=0.0):
    """A GPT from one of gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once into GPT2_CACHE_DIR), or from a
    local folder holding config.json and model.safetensors, as the hub has them and save_pretrained writes."""
    name = gpt2_name(name_or_dir)
    if name:
        config = GPTConfig(**PRETRAINED[name], dropout=dropout)
        cache = Path(os.environ.get("GPT2_CACHE_DIR", Path.home() / ".cache" / "gpt2-sft-dpo")).expanduser()
        weights = download(HUB_URL.format(name=name), cache / name / "model.safetensors",
                           hint=f"Without internet access, get {name}'s config.json and model.safetensors from "
                                f"huggingface.co/openai-community/{name} elsewhere, put them in a directory, "
                                f"and pass that directory instead of the name.")
    else:
        check_source(name_or_dir)
        directory = Path(name_or_dir)
        config = read_hub_config(directory / "config.json", dropout)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            pickled = (directory / "pytorch_model.bin").exists()
            why = " (pytorch_model.bin is a pickle, which this loader never opens)" if pickled else ""
            raise InputError(f"{weights}: no such file{why}; the directory needs model.safetensors")
    with torch.device("meta"):  # shapes only: no memory and no random init for weights about to be replaced
        model = GPT(config)
    tensors, _ = read_safetensors(weights)
    model.load_state_dict(state_dict_from_hub(tensors, model, weights), assign=True)  # the file's tensors, as they are
    model.transformer.wte.weight = model.lm_head.weight  # assign=True gave the two tied names separate Parameters
    return model


def save_pretrained(model, directory):
    """Write config.json and model.safetensors in the hub's layout: from_pretrained (ours, or Hugging Face's
    GPT2LMHeadModel) loads them back. Each file is written atomically. `model` must have no LoRA layers."""
    directory = Path(directory)
    deepest = next(path for path in [directory, *directory.parents] if path.exists())  # must be a folder
    if not deepest.is_dir():
        where = "is a file" if deepest == directory else f"lies under {deepest}, which is a file"
        raise InputError(f"{directory}: {where}, not a folder; save_pretrained writes config.json and "
                         f"model.safetensors into a folder")
    if lora_layers(model):
        raise ValueError("this model has LoRA layers, whose names a GPT-2 checkpoint does not have: save the "
                         "adapter with lora.save_lora, or save lora.merged_model(model) (a plain GPT-2)")
    tensors = {name: tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
               for name, tensor in model.state_dict().items() if name != "lm_head.weight"}  # lm_head is wte, tied
    write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    c = model.config
    write_json(directory / "config.json", {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "layer_norm_epsilon": c.layer_norm_epsilon, "activation_function": "gelu_new",
        "bos_token_id": END_OF_TEXT, "eos_token_id": END_OF_TEXT, "tie_word_embeddings": True,
    })


def read_hub_config(path, dropout=0.0):
    """GPTConfig from a Hugging Face GPT-2 config.json."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; a model directory needs config.json and model.safetensors")
    hub = read_json(path)
    if hub.get("model_type", "gpt2") != "gpt2":
        raise InputError(f"{path}: model_type is {hub['model_type']!r}, this loader reads GPT-2 checkpoints only")
    try:  # older configs name the context length n_ctx
        return GPTConfig(block_size=int(hub.get("n_positions") or hub["n_ctx"]), vocab_size=int(hub["vocab_size"]),
                         n_layer=int(hub["n_layer"]), n_head=int(hub["n_head"]), n_embd=int(hub["n_embd"]),
                         layer_norm_epsilon=float(hub.get("layer_norm_epsilon", 1e-5)), dropout=dropout)
    except KeyError as e:
        raise InputError(f"{path}: missing the GPT-2 setting {e}") from None
    except (TypeError, ValueError) as e:  # not a number, or numbers that make no GPT (n_embd % n_head)
        raise InputError(f"{path}: {e}") from None


def state_dict_from_hub(tensors, model, source):
    """Rename and transpose a hub checkpoint's tensors into `model`'s state dict, checking every name and shape."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}  # lm_head is tied
    ours = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")  # present when Hugging Face saved a GPT2LMHeadModel
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied output layer, and causal-mask buffers that older checkpoints carry
        name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t().contiguous()
        ours[name] = tensor
    missing, unexpected = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
    if missing or unexpected:
        raise InputError(f"{source}: does not match a GPT-2 with n_layer={model.config.n_layer}: "
                         f"missing {missing[:5]} and unexpected {unexpected[:5]} (at most 5 of each)")
    for name, shape in expected.items():
        if ours[name].shape != shape:
            raise InputError(f"{source}: tensor {name} has shape {tuple(ours[name].shape)}, the model (n_embd="
                             f"{model.config.n_embd}, vocab_size={model.config.vocab_size}) expects {tuple(shape)}")
        ours[name] = ours[name].float()
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    return ours


# -----------------------------------------------------------------------------
# model folders: written by save_model, read by load_model

def save_model(model, directory, config):
    """FFT: the hub layout. LoRA: the adapter, and adapter_config.json naming the model it adapts."""
    directory = Path(directory)
    if not config["lora_r"]:
        save_pretrained(model, directory)
        return
    base = config["init_from"]
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    save_lora(model, directory / ADAPTER_FILE)
    write_json(directory / ADAPTER_CONFIG, {
        "base_model_name_or_path": base, "r": config["lora_r"], "lora_alpha": config["lora_alpha"],
        "use_rslora": config["lora_rslora"],  # PEFT's name: the scale is alpha / sqrt(r), not alpha / r
        "target_modules": config["lora_targets"].split(","),
    })


def model_chain(name_or_dir):
    """What load_model(name_or_dir) is built from, read from JSON alone: [a GPT-2 name or hub folder, then the
    adapter folders stacked on it, each naming the one before as its base_model_name_or_path]. A run folder
    means its last/, the final weights (best/ is chosen on dev: used when named, <run>/best, or alone)."""
    chain = []
    while gpt2_name(name_or_dir) is None:
        check_source(name_or_dir)
        directory = Path(name_or_dir)
        if not (directory / "config.json").exists() and not (directory / ADAPTER_CONFIG).exists():
            directory = next((directory / kept for kept in ("last", "best") if (directory / kept).is_dir()), directory)
        if directory.resolve() in [d.resolve() for d in chain]:
            raise InputError(f"{directory / ADAPTER_CONFIG}: its base_model_name_or_path leads back to {directory}")
        chain.insert(0, directory)
        if not (directory / ADAPTER_CONFIG).is_file():
            return chain
        try:
            name_or_dir = read_json(directory / ADAPTER_CONFIG)["base_model_name_or_path"]
        except (KeyError, TypeError) as e:
            raise InputError(f"{directory / ADAPTER_CONFIG}: not an adapter config with a base_model_name_or_path "
                             f"({e!r})") from None
    return [name_or_dir, *chain]


def model_context(name_or_dir):
    """The positions (block_size) of what load_model(name_or_dir) loads, from JSON alone, so that lengths are
    checked before any weights are loaded: an adapter's is its base model's."""
    base = model_chain(name_or_dir)[0]
    return 1024 if gpt2_name(base) else read_hub_config(Path(base) / "config.json").block_size


def load_model(name_or_dir, adapter=None, dropout=0.0):
    """A plain GPT (no LoRA layers) from a GPT-2 name, a hub-layout folder, a LoRA model folder (its base loaded
    first, then each adapter folded in: W + (alpha/r) B A) or a run folder (its last/; name <run>/best for the
    best dev evaluation's). `adapter` (a file lora.save_lora wrote) is folded in on top."""
    base, *adapters = model_chain(name_or_dir)
    model = from_pretrained(base, dropout=dropout)
    for file in [directory / ADAPTER_FILE for directory in adapters] + ([adapter] if adapter is not None else []):
        model = merged_model(load_lora(model, file))
    return model


def is_sft_run(init_from):
    """Whether init_from is a run folder or one of its model folders (SFT->DPO), not GPT-2 itself (DPO only)."""
    directory = Path(init_from)
    return directory.is_dir() and any((d / "results.json").exists() for d in (directory, directory.parent))


# -----------------------------------------------------------------------------
# checkpoint.pt: the exact state of an unfinished run

def save_checkpoint(path, model, optimizer, progress):
    """Everything needed to continue exactly: weights (for LoRA only A and B: the rest is init_from), AdamW's
    moments, where we are in the data (epoch, batch) and every random number generator."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"model": lora_state_dict(model) or model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": rng, **progress}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, model, optimizer):
    """Restore what save_checkpoint saved; returns the progress dict (epoch, batch, step, ...)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never runs code
        missing = set(lora_state_dict(model) or model.state_dict()) - set(state["model"])
        if missing:
            raise KeyError(f"it lacks {sorted(missing)[:3]} (was it written by a run with other settings?)")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise InputError(f"{path}: cannot resume from it: {e}") from None
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}


# -----------------------------------------------------------------------------
# resuming: the progress record, and the settings a run was trained with

# settings a resumed run may change: they do not change what is trained
RESUMABLE_CHANGES = ("resume", "checkpoint_every", "device", "out_dir", "data_dir", "cache_dir", "eval_batch_size",
                     "compile", "grad_accum", "live_reference", "log_every", "save_best", "keep_checkpoints",
                     "logprobs", "wandb_project")


def start_or_resume(run, model, optimizer):
    """A fresh progress record, or with --resume the one in checkpoint.pt (refused if it was written with
    other settings). A fresh LoRA run writes its starting A and B to lora_init.safetensors (--lora_init)."""
    config, checkpoint = run.config, Path(run.config["out_dir"]) / CHECKPOINT
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "train_seconds": 0.0, "eval_seconds": 0.0,
                "real_tokens": 0, "config": trained_with(config)}
    if config["resume"] and checkpoint.exists():
        progress = load_checkpoint(checkpoint, model, optimizer)
        check_same_settings(checkpoint, progress.get("config", {}), config)
        if run.master:
            print(f"resuming from {checkpoint}: epoch {progress['epoch'] + 1}, step {progress['step']}")
        return progress
    if config["resume"] and run.master:
        print(f"--resume: no {checkpoint} yet, so starting from the beginning")
    if config["lora_r"] and run.master:
        save_lora(model, Path(config["out_dir"]) / "lora_init.safetensors")
    return progress


def finished_results(run):
    """With --resume, the results of a run that has already finished (its checkpoint.pt is gone): it is not
    trained again, and one trained with other settings is refused rather than overwritten."""
    config, path = run.config, Path(run.config["out_dir"]) / "results.json"
    if not (config["resume"] and path.exists() and not (path.parent / CHECKPOINT).exists()):
        return None
    results = read_json(path)
    check_same_settings(path, results.get("config", {}), config)
    if run.master:
        print(f"--resume: {path} says this run has finished; not training it again")
    return results


def trained_with(config):
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def check_same_settings(path, saved, config):
    """Settings that change what is trained must be what `path` was written with."""
    changed = [(k, v, config.get(k)) for k, v in trained_with(saved).items() if config.get(k) != v]
    if changed:
        k, then, now = changed[0]
        raise InputError(f"{path}: written by a run with other settings (--{k} {then} then, {now} now); "
                         f"resume with the same settings or use another --out_dir")


# -----------------------------------------------------------------------------
# results.json, and the costs it records

def run_results(run, regime, model, progress):
    """What results.json holds. `score` and `metrics` are the final evaluation's (nothing is selected on the dev
    set it is scored on); `best_score` and `best_epoch` the best dev evaluation's, by `selection` (in best/)."""
    config, history = run.config, progress["history"]
    final = history[-1]
    best = max(history, key=lambda h: h["selection"])
    return {
        "task": config["task"], "regime": regime, "method": "lora" if config["lora_r"] else "fft",
        "score": final["score"], "score_name": "accuracy" if config["task"] == "paraphrase" else "chrf",
        "metrics": {k: v for k, v in final.items() if k not in ("epoch", "step", "train_loss", "score", "selection")},
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
    print(f"{results['task']} {results['regime']} {results['method']}: {metrics} (dev, final; the best, "
          f"{results['best_score']:.4f}, at epoch {results['best_epoch']:g}); train {results['train_seconds']:.1f}s, "
          f"eval {results['eval_seconds']:.1f}s, {results['tokens_per_second']:.0f} tokens/s, peak memory "
          f"{results['peak_memory_bytes'] / 2**20:.0f} MiB, {results['trainable_parameters']:,} of "
          f"{results['total_parameters']:,} parameters trained, on {results['device']}")


def reset_peak_memory(device_type):
    """Count peak memory from now (a study measures condition after condition in one process)."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with suppress(OSError):  # Linux: reset the process's peak resident memory (elsewhere: no such file)
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device_type):
    """GPU: the most memory PyTorch had allocated. CPU: the process's peak resident memory (all of it)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    if device_type == "mps":
        return torch.mps.driver_allocated_memory()
    if Path("/proc/self/status").exists():  # Linux: VmHWM, which clear_refs resets
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
