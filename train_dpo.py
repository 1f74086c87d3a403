"""
Direct Preference Optimization (DPO, Rafailov et al. 2023) of GPT-2 on one of the two tasks, FFT or LoRA.

    python train_dpo.py --task paraphrase                                   # DPO-only: from pretrained gpt2
    python train_dpo.py --task paraphrase --init_from out/sft-paraphrase-fft # SFT->DPO: from an SFT run
    python train_dpo.py --task sonnet --lora_r 8 --beta 0.1                 # LoRA

DPO trains on pairs (x, y_w, y_l): a prompt, a chosen and a rejected answer. Its loss needs no reward model:

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where pi is the model being trained (the policy) and ref the frozen model it started from. The implicit
reward of an answer is beta * (log pi - log ref): DPO raises the chosen answer's reward above the rejected
one's, and beta sets how far from the reference the policy may move.

The pairs mirror each task's supervised objective:
- paraphrase: the course's prompt; chosen = the correct answer token, rejected = the other one.
- sonnets: the first 3 lines; chosen = the true rest of the sonnet, rejected = a continuation sampled from
  the starting model (temperature 1.2, top-p 0.9, seeded), sampled once from the training sonnets and cached.

Everything else (settings, optimizer, schedule, checkpoints, --resume, results.json) is train_sft.py's.
"""

import copy
import hashlib
import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import train_sft
from data.batching import Example, batch_indices, collate
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example
from data.sonnets import split_prompt
from data.tokenizer import END_OF_TEXT, encode
from eval import generate_sonnets
from fileio import InputError, read_safetensors, writable_dir, write_json, write_safetensors
from lora import lora_layers, merged_state_dict
from train_sft import (all_reduce_sum, autocast_context, batch_logprobs, check_lengths, compute_dtype,
                       configure_optimizer, describe, end_of_epoch, epoch_batches, finish, gradient_sync, load_policy,
                       load_task_data, micro_batches, optimizer_step, print_results, progress_bar, reset_peak_memory,
                       run_results, set_lr, setup_distributed, start_or_resume, wrap_model)

# -----------------------------------------------------------------------------
# settings: train_sft.py's, with these changes and additions
SETTINGS = {
    **train_sft.SETTINGS,
    "init_from": ("gpt2", str, "DPO-only: a GPT-2 name or model directory; SFT->DPO: an SFT run's out_dir"),
    "out_dir": (None, str, "where this run writes; default out/dpo-{task}-{fft|lora}"),
    "dropout": (0.0, float, "off: at step 0 the policy must compute exactly the reference's function, and "
                            "dropout noise in log pi - log ref biases the loss (the DPO authors' code turns it off)"),
    "beta": (0.1, float, "DPO's beta, the strength of the pull towards the reference (the paper's 0.1)"),
    "live_reference": (False, bool, "compute the reference's log-probabilities every step instead of once "
                                    "before training (the same loss, for checking; slower)"),
    "cache_dir": (None, str, "where reference log-probabilities and sampled rejections are cached, under a "
                             "fingerprint of what they depend on; default out_dir"),
}


# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    """The DPO loss of each pair (Rafailov et al. 2023, eq. 7), and the implicit rewards beta * (log pi - log ref).

        losses = -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])
    All inputs are (B,) summed log-probabilities of whole answers. Returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the rewards are detached (they are for logging, not for gradients).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def concatenated_logps(model, chosen, rejected, device):
    """The policy's log-probabilities of the chosen and the rejected answers (lists of Examples) in one
    forward pass over one batch of 2B rows: half the kernel launches of two passes, and one backward."""
    logps = batch_logprobs(model, collate(chosen + rejected), device)
    return logps[:len(chosen)], logps[len(chosen):]


# -----------------------------------------------------------------------------
# preference pairs


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example


def paraphrase_pairs(quora_pairs):
    """Same prompt; chosen = the correct answer token, rejected = the other one."""
    pairs = []
    for p in quora_pairs:
        prompt = paraphrase_example(p).prompt
        right, wrong = (YES_TOKEN, NO_TOKEN) if p.label == 1 else (NO_TOKEN, YES_TOKEN)
        pairs.append(Pair(Example(prompt, [right]), Example(prompt, [wrong])))
    return pairs


def sonnet_pairs(sonnets, rejected_texts):
    """Prompt = the first 3 lines; chosen = the true rest, rejected = a sampled rest; both end with end-of-text."""
    pairs = []
    for sonnet, rejected in zip(sonnets, rejected_texts, strict=True):
        prompt, rest = split_prompt(sonnet.text)
        prompt_ids = encode(prompt)
        pairs.append(Pair(Example(prompt_ids, encode(rest) + [END_OF_TEXT]),
                          Example(prompt_ids, encode(rejected) + [END_OF_TEXT])))
    return pairs


def sample_rejections(model, sonnets, config, cache_dir, fingerprint):
    """For each sonnet, what the starting model writes after its first 3 lines (cached: sampling is slow)."""
    prompts = [split_prompt(s.text)[0] for s in sonnets]
    key = fingerprint_of(fingerprint, prompts, config["temperature"], config["top_p"], config["max_new_tokens"],
                         config["seed"])
    path = Path(cache_dir) / f"rejections-{key}.json"
    if path.exists():
        return json.loads(path.read_text())["rejected"]
    written = generate_sonnets(model, prompts, temperature=config["temperature"], top_p=config["top_p"],
                               max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                               batch_size=config["eval_batch_size"], device=config["device"])
    rejected = [text[len(prompt):] for prompt, text in zip(prompts, written)]  # generate_sonnets returns prompt + new
    write_json(path, {"rejected": rejected, "prompts": prompts})
    return rejected


# -----------------------------------------------------------------------------
# the reference model: the frozen starting point


def fingerprint_of(*parts):
    """A short hash of what a cached result depends on (weights, token ids, settings)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):  # a state dict
            for name in sorted(part):
                h.update(name.encode())
                h.update(part[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, default=str).encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model):
    """Of the function the model computes: with fresh LoRA adapters (B = 0) that is the base model's, so
    DPO-only FFT and LoRA share one cache."""
    return fingerprint_of(merged_state_dict(model))


@contextmanager
def adapters_off(model):
    """With LoRA, the reference needs no second copy of GPT-2: it is the same network with its adapters
    switched off (h = W x; the LoRA update is scaled by 0). After SFT with LoRA, the SFT adapter was folded
    into W when the model was loaded, so "adapters off" is the SFT model, which is the right reference."""
    layers = lora_layers(model).values()
    saved = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling = scaling


@torch.no_grad()
def reference_logps(model, pairs, config, autocast):
    """log ref(chosen | x) and log ref(rejected | x) of every pair: (N,), (N,) float32, in eval mode."""
    was_training = model.training
    model.eval()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    order = batch_indices([len(p.chosen) + len(p.rejected) for p in pairs], config["eval_batch_size"])
    for idx in order:
        with autocast:
            c, r = concatenated_logps(model, [pairs[i].chosen for i in idx], [pairs[i].rejected for i in idx],
                                      config["device"])
        chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return chosen, rejected


def cached_reference_logps(model, pairs, config, autocast, cache_dir, fingerprint, name):
    """reference_logps, computed once and kept under a fingerprint of the reference weights, the pairs and
    the tokenizer/dtype: a rerun, or another condition with the same reference and pairs, reads them back,
    and a changed model or data set can never pick up a stale file."""
    key = fingerprint_of(fingerprint, [(p.chosen.prompt, p.chosen.target, p.rejected.target) for p in pairs],
                         "gpt2-bpe", compute_dtype(config, config["device"].split(":")[0]),
                         config["device"].split(":")[0])
    path = Path(cache_dir) / f"reference-{name}-{key}.safetensors"
    if path.exists():
        tensors, _ = read_safetensors(path)
        return tensors["chosen"], tensors["rejected"]
    chosen, rejected = reference_logps(model, pairs, config, autocast)
    write_safetensors(path, {"chosen": chosen, "rejected": rejected})
    return chosen, rejected


def check_reference(model, pairs, ref_chosen, ref_rejected, config, autocast):
    """At step 0 policy and reference are the same model, so every margin must be 0 and the loss ln 2. If
    not, the reference is not the starting model (after LoRA SFT, for instance, base GPT-2 is the wrong one)."""
    policy_chosen, policy_rejected = reference_logps(model, pairs, config, autocast)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                        config["beta"])
    margin = (chosen_rewards - rejected_rewards).abs().max().item()
    tolerance = 1e-3 if isinstance(autocast, nullcontext) else 5e-2  # bfloat16 rounds differently per batch shape
    if margin > tolerance or abs(losses.mean().item() - math.log(2)) > tolerance:
        raise InputError(f"at step 0 the DPO loss is {losses.mean().item():.4f} (expected ln 2 = 0.6931) and a reward "
                         f"margin is {margin:.4g} (expected 0): the reference is not the model training starts from")


def preference_metrics(model, pairs, ref_chosen, ref_rejected, config, autocast):
    """Over the whole dev set: the DPO loss, reward accuracy (chosen reward > rejected), mean margin, and
    both rewards and log-probabilities. A falling chosen log-probability is not a bug: DPO optimises only
    the margin, and often lowers both answers' probabilities while pushing the rejected one down faster."""
    chosen, rejected = reference_logps(model, pairs, config, autocast)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config["beta"])
    return {"dpo_loss": losses.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
            "chosen_logp": chosen.mean().item(), "rejected_logp": rejected.mean().item()}


# -----------------------------------------------------------------------------
# training


def check_config(config):
    config = train_sft.check_config(config, prefix="dpo")
    if not (config["beta"] > 0 and math.isfinite(config["beta"])):
        raise InputError(f"--beta {config['beta']}: must be a positive number such as 0.1")
    config["cache_dir"] = config["cache_dir"] or config["out_dir"]
    writable_dir(config["cache_dir"], "--cache_dir")
    return config


def train(config):
    """Run DPO as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    config = check_config({**train_sft.defaults(SETTINGS), **config})
    rank, world_size = setup_distributed(config)
    master = rank == 0
    out_dir, device, cache_dir = Path(config["out_dir"]), config["device"], Path(config["cache_dir"])
    device_type = device.split(":")[0]
    train_data, dev = load_task_data(config)  # before the model: a missing file fails in a second
    if config["task"] == "paraphrase":
        pairs, dev_pairs = paraphrase_pairs(train_data), paraphrase_pairs(dev)
    else:
        pairs = None  # the rejected answers are sampled from the starting model, loaded next

    reset_peak_memory(device_type)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    raw_model = load_policy(config).to(device)  # the starting model, and the trained one
    autocast = autocast_context(config, device_type)
    fingerprint = weights_fingerprint(raw_model)
    if pairs is None:  # sonnets: sample once from the starting model, cache; dev rejections only for measuring
        pairs = sonnet_pairs(train_data, sample_rejections(raw_model, train_data, config, cache_dir, fingerprint))
        held_out, references = dev
        true = [s for s in references if s.number in {h.number for h in held_out}]
        dev_pairs = sonnet_pairs(true, sample_rejections(raw_model, true, config, cache_dir, fingerprint))
    check_lengths([p.chosen for p in pairs] + [p.rejected for p in pairs], raw_model.config.block_size)

    # The reference: by default its log-probabilities are computed once, now, before any update (it never
    # changes, so the loss is the same and each step skips a forward pass). --live_reference recomputes them
    # every step: with LoRA on the same network with adapters off, with FFT on a frozen copy.
    ref_chosen, ref_rejected = cached_reference_logps(raw_model, pairs, config, autocast, cache_dir, fingerprint, "train")
    dev_ref = cached_reference_logps(raw_model, dev_pairs, config, autocast, cache_dir, fingerprint, "dev")
    reference = None
    if config["live_reference"]:
        reference = raw_model if config["lora_r"] else copy.deepcopy(raw_model).requires_grad_(False).eval()

    optimizer = configure_optimizer(raw_model, config["lr"], config["weight_decay"], device_type)
    checkpoint = out_dir / "checkpoint.pt"
    progress = start_or_resume(config, checkpoint, raw_model, optimizer, master)
    lengths = [len(p.chosen) + len(p.rejected) for p in pairs]
    if progress["step"] == 0:
        first = epoch_batches(lengths, config, 0, world_size)[0]
        check_reference(raw_model, [pairs[i] for i in first], ref_chosen[first], ref_rejected[first], config, autocast)
    model = wrap_model(raw_model, config, world_size)
    total_steps = config["epochs"] * len(epoch_batches(lengths, config, 0, world_size))
    if master:
        print(f"{config['task']} DPO ({describe(config)}, beta={config['beta']}, "
              f"{'live' if reference is not None else 'precomputed'} reference) of {config['init_from']} on "
              f"{device}: {raw_model.num_parameters(trainable_only=True):,} of {raw_model.num_parameters():,} "
              f"parameters train; {len(pairs)} pairs, {total_steps} steps")

    def dev_metrics(m):
        return preference_metrics(m, dev_pairs, *dev_ref, config, autocast)

    while progress["epoch"] < config["epochs"]:
        batches = epoch_batches(lengths, config, progress["epoch"], world_size)
        model.train()
        bar = progress_bar(progress, len(batches), config, master)
        t0 = time.time()
        while progress["batch"] < len(batches):
            indices = batches[progress["batch"]]
            lr = set_lr(optimizer, progress["step"], total_steps, config)
            parts = micro_batches(indices[rank::world_size], config["grad_accum"])  # this process's share
            loss_sum, real_tokens = 0.0, 0
            for k, part in enumerate(parts):
                chosen, rejected = [pairs[i].chosen for i in part], [pairs[i].rejected for i in part]
                with gradient_sync(model, k == len(parts) - 1), autocast:
                    policy_chosen, policy_rejected = concatenated_logps(model, chosen, rejected, device)
                if reference is None:
                    reference_chosen, reference_rejected = ref_chosen[part], ref_rejected[part]
                else:
                    with adapters_off(reference) if config["lora_r"] else nullcontext():
                        reference_chosen, reference_rejected = reference_logps(reference, [pairs[i] for i in part],
                                                                               config, autocast)
                losses, _, _ = dpo_loss(policy_chosen, policy_rejected, reference_chosen.to(device),
                                        reference_rejected.to(device), config["beta"])
                loss = losses.sum() / (len(indices) / world_size)  # the mean over the whole batch's pairs
                loss.backward()
                loss_sum += loss.item() / world_size
                real_tokens += sum(len(e) for e in chosen + rejected)
            loss_sum, real_tokens = all_reduce_sum(loss_sum, real_tokens, device, world_size)
            t0 = optimizer_step(raw_model, optimizer, loss_sum, real_tokens, lr, config, progress, checkpoint,
                                bar, t0, len(batches), master)
        bar.close()
        progress["train_seconds"] += time.time() - t0
        end_of_epoch(raw_model, optimizer, config, dev, progress, loss_sum, checkpoint, master, world_size,
                     extra_metrics=dev_metrics)

    results = None
    if master:
        results = run_results(config, "sft_dpo" if is_sft_run(config["init_from"]) else "dpo", raw_model, progress,
                              device_type, world_size)
        results["beta"] = config["beta"]
        print_results(results)
    return finish(results, out_dir, rank)


def is_sft_run(init_from):
    """Whether init_from is a training run's folder (SFT->DPO) rather than GPT-2 itself (DPO-only)."""
    directory = Path(init_from)
    return directory.is_dir() and ((directory / "results.json").exists() or (directory.parent / "results.json").exists())


def main(argv=None):
    try:
        train(train_sft.parse_args(argv, SETTINGS, __doc__))
    except InputError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
