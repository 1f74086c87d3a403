"""
The run folder: everything a training run writes and every script reads back, in one place (after nanochat's
checkpoint manager).

    out/sft-paraphrase-fft/
        last/               the final epoch's model (always)
        best/               the best dev epoch's model (the course's practice; a study keeps only last/)
        checkpoint.pt       resumable state while the run is unfinished (deleted when it ends unless --keep_checkpoints)
        results.json        scores, costs and the full config (trainer.run_results)
        dev_predictions.json, best_dev_predictions.json     the final and the best epoch's dev predictions

A model folder (last/, best/) is one of two layouts:
- FFT: the Hugging Face hub's GPT-2 layout, config.json + model.safetensors (model.GPT.save_pretrained);
- LoRA: adapter.safetensors + adapter_config.json, whose "base_model_name_or_path" names the model it adapts
  (a GPT-2 name, a hub folder, or another adapter folder: SFT LoRA -> DPO LoRA stacks).

load_model reads any of these, a GPT-2 name, or a whole run folder (its best/, else its last/).
"""

import json
import random
from pathlib import Path

import torch

from fileio import InputError, atomic_open, write_json
from lora import load_lora, lora_state_dict, merged_model, save_lora
from model import GPT, PRETRAINED, read_hub_config

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
CHECKPOINT = "checkpoint.pt"


# -----------------------------------------------------------------------------
# the hub's GPT-2 layout (config.json + model.safetensors)


def from_pretrained(name_or_dir, dropout=0.0):
    """A GPT-2 name (downloaded once) or a hub-layout folder -> GPT."""
    return GPT.from_pretrained(name_or_dir, dropout=dropout)


def save_pretrained(model, directory):
    """Write `model` (no LoRA layers) as config.json + model.safetensors."""
    model.save_pretrained(directory)


# -----------------------------------------------------------------------------
# model folders: written by save_model, read by load_model


def save_model(model, directory, config):
    """FFT: the hub layout (config.json + model.safetensors). LoRA: only the adapter, plus adapter_config.json
    naming the model it adapts, which is all load_model needs to rebuild the fine-tuned model."""
    directory = Path(directory)
    if not config["lora_r"]:
        model.save_pretrained(directory)
        return
    base = config["init_from"]
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    save_lora(model, directory / ADAPTER_FILE)
    write_json(directory / ADAPTER_CONFIG, {
        "base_model_name_or_path": base, "r": config["lora_r"], "lora_alpha": config["lora_alpha"],
        "use_rslora": config["lora_rslora"],  # PEFT's name: the scale is alpha / sqrt(r), not alpha / r
        "target_modules": config["lora_targets"].split(","),
    })


def check_source(name_or_dir, flag):
    """What a script was pointed at must be a GPT-2 name or an existing directory: checked before any work."""
    if str(name_or_dir).removeprefix("openai-community/") not in PRETRAINED and not Path(name_or_dir).is_dir():
        raise InputError(f"{flag} {str(name_or_dir)!r}: neither a GPT-2 name ({', '.join(PRETRAINED)}) "
                         f"nor an existing directory")


def model_folder(name_or_dir):
    """The model folder a path means: a run folder means its best/ (else last/); anything else is itself."""
    directory = Path(str(name_or_dir))
    if directory.is_dir() and not (directory / "config.json").exists() and not (directory / ADAPTER_CONFIG).exists():
        for kept in ("best", "last"):
            if (directory / kept).is_dir():
                return directory / kept
    return directory


def model_context(name_or_dir):
    """How many positions (block_size) the model that load_model(name_or_dir) loads has, read from its JSON
    files alone, so that lengths are checked before any weights are loaded: a GPT-2 name (1024), a hub folder's
    config.json, an adapter folder's base (followed to the end), or a run folder's best/ (else last/)."""
    seen = set()
    while str(name_or_dir).removeprefix("openai-community/") not in PRETRAINED:
        directory = model_folder(name_or_dir)
        if not directory.is_dir():
            raise InputError(f"{str(name_or_dir)!r} is neither a GPT-2 name ({', '.join(PRETRAINED)}) nor a directory")
        if not (directory / ADAPTER_CONFIG).is_file():
            return read_hub_config(directory / "config.json").block_size
        if directory.resolve() in seen:
            raise InputError(f"{directory / ADAPTER_CONFIG}: its base_model_name_or_path leads back to {directory}")
        seen.add(directory.resolve())
        name_or_dir = adapter_base(directory)  # an adapter's context is its base model's
    return 1024  # all four of OpenAI's sizes


def adapter_base(directory):
    """The base_model_name_or_path of an adapter folder."""
    config_path = Path(directory) / ADAPTER_CONFIG
    try:
        return json.loads(config_path.read_text())["base_model_name_or_path"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{config_path}: not an adapter config with a base_model_name_or_path ({e!r})") from None


def load_model(name_or_dir, adapter=None, dropout=0.0):
    """A plain GPT (no LoRA layers) from any of:

    - a GPT-2 name (gpt2, gpt2-medium, ...) or a hub-layout directory (config.json + model.safetensors);
    - a LoRA model folder: its base is loaded first (by this same function, so a base may itself be an adapter
      folder) and the adapter is folded into its weights, W + (alpha/r) B A;
    - a training run's folder (out/my-run): its best/ checkpoint, else its last/.
    `adapter` (a .safetensors file written by lora.save_lora) is folded in on top.
    """
    directory = model_folder(name_or_dir)
    if directory.is_dir() and (directory / ADAPTER_CONFIG).is_file():
        base = load_model(adapter_base(directory), dropout=dropout)
        model = merged_model(load_lora(base, directory / ADAPTER_FILE))
    else:
        model = GPT.from_pretrained(directory if directory.is_dir() else name_or_dir, dropout=dropout)
    if adapter is not None:
        model = merged_model(load_lora(model, adapter))
    return model


def is_sft_run(init_from):
    """Whether init_from is a training run's folder or one of its model folders (SFT->DPO), rather than GPT-2
    itself (DPO-only)."""
    directory = Path(init_from)
    return directory.is_dir() and ((directory / "results.json").exists() or (directory.parent / "results.json").exists())


# -----------------------------------------------------------------------------
# checkpoint.pt: the exact state of an unfinished run


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
