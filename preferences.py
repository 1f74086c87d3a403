"""
Preference pairs (x, y_w, y_l), what DPO (train_dpo.py) and ORPO (train_orpo.py) train on, and their shared run.

- paraphrase: the course's prompt; chosen y_w = the correct answer token, rejected y_l = the other one.
- sonnets: the first 3 lines; chosen = the true rest and end-of-text, rejected = the token ids the starting model
  (the DPO paper's choice; or --rejections_from) samples after them, end-of-text only where it wrote one.
"""

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import trainer
from checkpoint import check_source, load_model
from data.batching import Example
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example
from data.sonnets import continuation_examples
from data.tasks import load_task_data
from data.tokenizer import decode
from eval import check_lengths, check_task_lengths, chrf, sample_continuations
from fileio import fingerprint, read_cache, read_json, writable_dir, write_json
from lora import merged_state_dict
from train_sft import evaluate, predicted_targets

# -----------------------------------------------------------------------------
# the pairs


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example


def average_logps(logps, examples):
    """Per-token averages of summed log-probabilities (IPO, RPO, SimPO, ORPO): each divided by its example's
    number of target tokens. An answer with no target tokens has the sum 0, and its average is defined as 0."""
    counts = torch.tensor([predicted_targets(e) for e in examples], dtype=logps.dtype)
    return logps / counts.clamp(min=1).to(logps.device)


def paraphrase_pairs(quora_pairs):
    """Same prompt; chosen = the correct answer token, rejected = the other one."""
    chosen = [paraphrase_example(p) for p in quora_pairs]
    return [Pair(c, Example(c.prompt, [NO_TOKEN if c.target == [YES_TOKEN] else YES_TOKEN])) for c in chosen]


def sonnet_pairs(sonnets, rejected):
    """Prompt = the first 3 lines; chosen = the true rest and end-of-text, rejected = the sampled token ids."""
    return [Pair(chosen, Example(chosen.prompt, tokens))
            for chosen, tokens in zip(continuation_examples(sonnets), rejected, strict=True)]


def sample_rejections(model, sonnets, config, cache_dir, weights_id, block_size):
    """The token ids `model` samples after each sonnet's first 3 lines, with a budget that fits the longest true
    rest; cached (sampling is slow; a damaged file is sampled again)."""
    chosen = continuation_examples(sonnets)
    prompts = [c.prompt for c in chosen]
    budget = min(max(len(c.target) for c in chosen), block_size - max(len(p) for p in prompts))
    key = fingerprint(weights_id, prompts, config["temperature"], config["top_p"], budget, config["seed"])
    path = Path(cache_dir) / f"rejections-{key}.json"
    cached = read_cache(path, read_json)
    if cached is not None:
        return cached["rejected"]
    rejected = sample_continuations(model, prompts, temperature=config["temperature"], top_p=config["top_p"],
                                    max_new_tokens=budget, seed=config["seed"], batch_size=config["eval_batch_size"],
                                    device=config["device"])
    write_json(path, {"rejected": rejected, "prompts": prompts})
    return rejected


def rejection_stats(pairs):
    """How the sampled rejections differ from the true continuations: mean sentence chrF of rejected against
    chosen, and both mean lengths (SFT->DPO samples from a model that has just learnt these sonnets)."""
    return {"chrf": statistics.fmean(chrf([decode(p.rejected.target)], [decode(p.chosen.target)]) for p in pairs),
            "chosen_tokens": statistics.fmean(len(p.chosen.target) for p in pairs),
            "rejected_tokens": statistics.fmean(len(p.rejected.target) for p in pairs)}


def weights_fingerprint(model):
    """Of the function the model computes: with fresh LoRA adapters (B = 0) that is the base model's, so
    DPO-only FFT and LoRA share one cache."""
    return fingerprint(merged_state_dict(model))


def preference_pairs(model, train_data, dev, config):
    """(training pairs, dev pairs). Sonnets: rejections sampled once (and cached) from the starting model or
    --rejections_from; the dev rejections are only for measuring, never trained on."""
    if config["task"] == "paraphrase":
        return paraphrase_pairs(train_data), paraphrase_pairs(dev)
    sampler = model if config["rejections_from"] is None else load_model(config["rejections_from"]).to(config["device"])
    weights_id, block_size = weights_fingerprint(sampler), model.config.block_size
    held_out, references = dev
    true = [s for s in references if s.number in {h.number for h in held_out}]
    return tuple(sonnet_pairs(sonnets, sample_rejections(sampler, sonnets, config, config["cache_dir"], weights_id,
                                                         block_size)) for sonnets in (train_data, true))


# -----------------------------------------------------------------------------
# DPO's and ORPO's run: its start and its end


def start(config):
    """From a checked config: (run, policy, training pairs, dev pairs, dev data). Every chosen answer's length
    is checked before any model loads (and before out_dir is made), the rejections' once they are sampled. The
    policy is the starting model (with LoRA adapters if asked), which is also the model trained."""
    config["cache_dir"] = config["cache_dir"] or config["out_dir"]
    writable_dir(config["cache_dir"], "--cache_dir")
    if config["rejections_from"] is not None:
        check_source(config["rejections_from"], "--rejections_from")
    train_data, dev = load_task_data(config)  # a missing file fails in a second
    chosen = ([p.chosen for p in paraphrase_pairs(train_data)] if config["task"] == "paraphrase"
              else continuation_examples(train_data))
    check_task_lengths(config, chosen, dev)
    run = trainer.start(config)
    policy = trainer.load_policy(run.config).to(run.device)
    pairs, dev_pairs = preference_pairs(policy, train_data, dev, run.config)
    check_lengths([e for p in pairs for e in (p.chosen, p.rejected)], policy.config.block_size)
    return run, policy, pairs, dev_pairs, dev


def fit(run, policy, pairs, dev, loss_fn, metrics, regime, title, extra):
    """trainer.fit on the pairs. The dev figures are the task's (train_sft.evaluate) and metrics(model)'s; a
    sonnet run's results.json adds "rejections" (rejection_stats), also printed."""
    config = run.config

    def dev_metrics(model):
        return {**evaluate(model, config["task"], dev, config, run.device), **metrics(model)}

    if config["task"] == "sonnet":
        extra = {**extra, "rejections": rejection_stats(pairs)}
        if run.master:
            print("rejections: " + ", ".join(f"{k} {v:.1f}" for k, v in extra["rejections"].items()))
    title = f"{config['task']} {title} of {config['init_from']}"
    sizes = [len(p.chosen) + len(p.rejected) for p in pairs]
    return trainer.fit(run, policy, sizes, loss_fn, dev_metrics, regime, title, extra)
