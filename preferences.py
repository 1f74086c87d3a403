"""
Preference pairs (x, y_w, y_l) for the two tasks: what DPO, RPO (train_dpo.py) and ORPO (train_orpo.py) train on.
They mirror each task's supervised objective:

- paraphrase: the course's prompt; chosen y_w = the correct answer token, rejected y_l = the other one.
- sonnets: the first 3 lines; chosen = the true rest of the sonnet and end-of-text, rejected = a continuation
  sampled from the starting model (the DPO paper's "sample from the starting model"; --rejections_from another
  model instead), kept as the sampled token ids (end-of-text only where the sampler wrote it), sampled once
  with a budget that fits the longest true rest, and cached. The dev pairs' rejections are only for measuring.
"""

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import trainer
from checkpoint import load_model
from data.batching import Example
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example
from data.sonnets import continuation_examples
from data.tasks import load_task_data
from data.tokenizer import decode
from eval import check_lengths, check_task_lengths, chrf, sample_continuations
from fileio import fingerprint, read_cache, read_json, write_json
from lora import merged_state_dict
from train_sft import predicted_targets



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
    pairs = []
    for p in quora_pairs:
        prompt = paraphrase_example(p).prompt
        right, wrong = (YES_TOKEN, NO_TOKEN) if p.label == 1 else (NO_TOKEN, YES_TOKEN)
        pairs.append(Pair(Example(prompt, [right]), Example(prompt, [wrong])))
    return pairs


def sonnet_pairs(sonnets, rejected):
    """Prompt = the first 3 lines; chosen = the true rest and end-of-text, rejected = the sampled token ids
    (with end-of-text only where the sampler wrote it)."""
    return [Pair(chosen, Example(chosen.prompt, tokens))
            for chosen, tokens in zip(continuation_examples(sonnets), rejected, strict=True)]


def sample_rejections(model, sonnets, config, cache_dir, weights_id, block_size):
    """For each sonnet, the token ids the sampling model writes after its first 3 lines, with a budget that fits
    the longest true rest (cached: sampling is slow)."""
    chosen = continuation_examples(sonnets)
    prompts = [c.prompt for c in chosen]
    budget = min(max(len(c.target) for c in chosen), block_size - max(len(p) for p in prompts))
    key = fingerprint(weights_id, prompts, config["temperature"], config["top_p"], budget, config["seed"])
    path = Path(cache_dir) / f"rejections-{key}.json"
    cached = read_cache(path, read_json)  # a damaged file is sampled again
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


def task_data(config):
    """(training records, dev data), with every chosen answer's length checked before any model loads (and
    before the run's folder is made); the rejections' lengths are checked once they are sampled."""
    train_data, dev = load_task_data(config)  # a missing file fails in a second
    chosen = ([p.chosen for p in paraphrase_pairs(train_data)] if config["task"] == "paraphrase"
              else continuation_examples(train_data))
    check_task_lengths(config, chosen, dev)
    return train_data, dev


def policy_and_pairs(run, train_data, dev):
    """The starting model (with LoRA adapters if asked), which is also the model trained, and the preference
    pairs: (policy, training pairs, dev pairs). DPO's and ORPO's."""
    policy = trainer.load_policy(run.config).to(run.device)
    pairs, dev_pairs = preference_pairs(policy, train_data, dev, run.config)
    check_lengths([e for p in pairs for e in (p.chosen, p.rejected)], policy.config.block_size)
    return policy, pairs, dev_pairs


def rejections_summary(run, pairs):
    """Sonnets: results.json's "rejections" (rejection_stats), also printed. Paraphrase: nothing."""
    if run.config["task"] != "sonnet":
        return {}
    stats = rejection_stats(pairs)
    if run.master:
        print("rejections: " + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))
    return {"rejections": stats}
