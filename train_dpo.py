"""
Direct Preference Optimization (DPO, Rafailov et al. 2023) of GPT-2 on one of the two tasks, FFT or LoRA.

    python train_dpo.py --task paraphrase                                   # DPO-only: from pretrained gpt2
    python train_dpo.py --task paraphrase --init_from out/sft-paraphrase-fft # SFT->DPO: from an SFT run
    python train_dpo.py --task sonnet --lora_r 8 --beta 0.1                 # LoRA

DPO trains on pairs (x, y_w, y_l): a prompt, a chosen and a rejected answer. Its loss needs no reward model:

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where pi is the model being trained (the policy) and ref the frozen model it started from. The implicit
reward of an answer is beta * (log pi - log ref): DPO raises the chosen answer's reward above the rejected
one's, and beta sets how far from the reference the policy may move. log pi(y|x) is the same summed
log-likelihood that SFT maximises (train_sft.batch_logprobs).

Variants, each beside dpo_loss with its paper: --label_smoothing eps (cDPO: preferences flipped with
probability eps), --loss_type ipo (IPO: a squared loss that holds the margin at 1/(2 beta) instead of pushing
it on) and --rpo_alpha alpha (RPO: + alpha * the chosen answer's NLL, which holds its likelihood up). ORPO,
which needs no reference model at all, is train_orpo.py.

The pairs mirror each task's supervised objective (preferences.py, shared with ORPO): for paraphrase the
correct answer token against the other one, for sonnets the true rest against one sampled from the starting
model.

The loop (settings, optimizer, schedule, checkpoints, --resume, results.json) is trainer.py's.
"""

import copy
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import trainer
from checkpoint import check_source, is_sft_run
from data.batching import batch_indices, collate
from fileio import InputError, fingerprint, read_safetensors, writable_dir, write_safetensors
from lora import lora_layers
from preferences import policy_and_pairs, rejections_summary, weights_fingerprint
from train_sft import batch_logprobs, evaluate, predicted_targets

# -----------------------------------------------------------------------------
# settings: trainer.py's, with these changes and additions
SETTINGS = {
    **trainer.SETTINGS,
    "init_from": ("gpt2", str, None, "DPO-only: a GPT-2 name or model directory; SFT->DPO: an SFT run's out_dir"),
    "out_dir": (None, str, None, "where this run writes; default out/dpo-{task}-{fft|lora}"),
    "dropout": (0.0, float, trainer.between(0, 0.999), "off: at step 0 the policy must compute exactly the "
                "reference's function, and dropout noise in log pi - log ref biases the loss (the DPO authors' "
                "code turns it off)"),
    "beta": (0.1, float, trainer.POSITIVE, "DPO's beta, the strength of the pull towards the reference (the paper's 0.1)"),
    "loss_type": ("sigmoid", str, trainer.one_of("sigmoid", "ipo"), "sigmoid: DPO (Rafailov et al. 2023); ipo: IPO "
                  "(Azar et al. 2023), on per-token average log-probabilities as in the IPO paper and TRL"),
    "label_smoothing": (0.0, float, (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"), "cDPO (Mitchell 2023, TRL's "
                        "label_smoothing): the share eps of preference labels taken to be flipped; 0 = DPO"),
    "rpo_alpha": (0.0, float, (lambda v: 0 <= v < math.inf, "must be 0 (off) or a positive number"),
                  "RPO (Pang et al. 2024, TRL's rpo_alpha): add alpha * the chosen answer's per-token NLL; 0 = off "
                  "(the paper's is 1)"),
    "live_reference": (False, bool, None, "compute the reference's log-probabilities every step instead of once "
                                          "before training (the same loss, for checking; slower)"),
    "cache_dir": (None, str, None, "where reference log-probabilities and sampled rejections are cached, under a "
                                   "fingerprint of what they depend on; default out_dir"),
    "rejections_from": (None, str, None, "sonnets: sample the rejected continuations from this model or run folder "
                                         "instead of the starting model (e.g. one shared set for every regime)"),
}


# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """The loss of each pair, and the implicit rewards beta * (log pi - log ref). With the margin of log-ratios
    h = (pi_c - ref_c) - (pi_r - ref_r):

        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     eps = label_smoothing
                 eps = 0: DPO (Rafailov et al. 2023, eq. 7); eps > 0: cDPO (Mitchell 2023, "A note on DPO with
                 noisy preferences"; TRL's label_smoothing), DPO's expected loss if each label is flipped with
                 probability eps
        ipo      (h - 1 / (2 beta))^2          IPO (Azar et al. 2023, eq. 17): the margin is pulled to 1/(2 beta)

    Inputs are (B,) log-probabilities of whole answers: summed for DPO, per-token averages for IPO (as the IPO
    paper and TRL use; pair_losses passes each what it reads). Returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the rewards are detached (they are for logging, not for gradients).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo" and not label_smoothing:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} with label_smoothing {label_smoothing}: expected sigmoid, or ipo "
                         f"without label smoothing")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def rpo_loss(losses, policy_chosen_avg_logps, alpha):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 3; TRL's rpo_alpha): the pair
    losses plus alpha times the chosen answer's per-token NLL, which holds up the chosen answer's likelihood
    (DPO alone often lowers it):
        L_RPO = L_DPO - alpha * log pi(y_w|x) / |y_w|                                             all (B,)"""
    return losses - alpha * policy_chosen_avg_logps


def average_logps(logps, examples):
    """Per-token averages of summed log-probabilities (IPO, RPO, ORPO): each divided by its example's number
    of target tokens. An answer with no target tokens has the sum 0, and its average is defined as 0 (not NaN)."""
    counts = torch.tensor([predicted_targets(e) for e in examples], dtype=logps.dtype)
    return logps / counts.clamp(min=1).to(logps.device)


def concatenated_logps(model, chosen, rejected, device):
    """The policy's log-probabilities of the chosen and the rejected answers (lists of Examples) in one
    forward pass over one batch of 2B rows: half the kernel launches of two passes, and one backward."""
    logps = batch_logprobs(model, collate(chosen + rejected), device)
    return logps[:len(chosen)], logps[len(chosen):]


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, pairs, config):
    """dpo_loss as --loss_type and --label_smoothing say, on what it reads: the summed log-probabilities, or
    for IPO the per-token averages. Only options that differ from plain DPO's are passed: DPO is dpo_loss(..., beta)."""
    if config["loss_type"] == "ipo":
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        policy_chosen, ref_chosen = average_logps(policy_chosen, chosen), average_logps(ref_chosen, chosen)
        policy_rejected, ref_rejected = average_logps(policy_rejected, rejected), average_logps(ref_rejected, rejected)
    options = {k: config[k] for k in ("loss_type", "label_smoothing") if config[k] != SETTINGS[k][0]}
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config["beta"], **options)


# -----------------------------------------------------------------------------
# the reference model: the frozen starting point


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


def cached_reference_logps(model, pairs, config, autocast, cache_dir, weights_id, name):
    """reference_logps, computed once and kept under a fingerprint of the reference weights, the pairs and
    the tokenizer/dtype: a rerun, or another condition with the same reference and pairs, reads them back,
    and a changed model or data set can never pick up a stale file."""
    device_type = config["device"].split(":")[0]
    key = fingerprint(weights_id, [(p.chosen.prompt, p.chosen.target, p.rejected.target) for p in pairs],
                         "gpt2-bpe", trainer.compute_dtype(config, device_type), device_type)
    path = Path(cache_dir) / f"reference-{name}-{key}.safetensors"
    if path.exists():
        tensors, _ = read_safetensors(path)
        return tensors["chosen"], tensors["rejected"]
    chosen, rejected = reference_logps(model, pairs, config, autocast)
    write_safetensors(path, {"chosen": chosen, "rejected": rejected})
    return chosen, rejected


def check_reference(model, pairs, ref_chosen, ref_rejected, config, autocast):
    """At step 0 policy and reference are the same model, so every margin h must be 0 and the loss its value
    there: ln 2 for DPO and cDPO ((1 - eps) ln 2 + eps ln 2), (0 - 1/(2 beta))^2 for IPO. If not, the reference
    is not the starting model (after LoRA SFT, for instance, base GPT-2 is the wrong one)."""
    policy_chosen, policy_rejected = reference_logps(model, pairs, config, autocast)
    losses, chosen_rewards, rejected_rewards = pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                           pairs, config)
    margin, loss = (chosen_rewards - rejected_rewards).abs().max().item(), losses.mean().item()
    expected = (1 / (2 * config["beta"])) ** 2 if config["loss_type"] == "ipo" else math.log(2)
    tolerance = 1e-3 if isinstance(autocast, nullcontext) else 5e-2  # bfloat16 rounds differently per batch shape
    if margin > tolerance or abs(loss - expected) > tolerance * max(1.0, expected):
        raise InputError(f"at step 0 the {config['loss_type']} loss is {loss:.4f} (expected {expected:.4f}, its value "
                         f"when policy = reference) and a reward margin is {margin:.4g} (expected 0): the reference "
                         f"is not the model training starts from")


def preference_metrics(model, pairs, ref_chosen, ref_rejected, config, autocast):
    """Over the whole dev set: the loss (--loss_type's, without RPO's NLL), reward accuracy (chosen reward >
    rejected), mean margin, and both rewards and log-probabilities. A falling chosen log-probability is not a
    bug: DPO optimises only the margin, and often lowers both answers' probabilities while pushing the rejected
    one down faster (RPO's NLL term is there to stop that)."""
    chosen, rejected = reference_logps(model, pairs, config, autocast)
    losses, chosen_rewards, rejected_rewards = pair_losses(chosen, rejected, ref_chosen, ref_rejected, pairs, config)
    return {"dpo_loss": losses.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
            "chosen_logp": chosen.mean().item(), "rejected_logp": rejected.mean().item()}


# -----------------------------------------------------------------------------
# training


def check_config(config, settings=SETTINGS, prefix="dpo"):
    """trainer.check_config's checks, and DPO's (train_orpo.py's too, with its settings)."""
    config = trainer.check_config(config, settings, prefix=prefix)
    if config.get("loss_type") == "ipo" and config["label_smoothing"]:
        raise InputError(f"--label_smoothing {config['label_smoothing']}: only for --loss_type sigmoid (cDPO); "
                         f"IPO has none")
    config["cache_dir"] = config["cache_dir"] or config["out_dir"]
    writable_dir(config["cache_dir"], "--cache_dir")
    if config["rejections_from"] is not None:
        check_source(config["rejections_from"], "--rejections_from")
    return config


def train(config):
    """Run DPO as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    run = trainer.start(check_config(config))
    config, device = run.config, run.device
    policy, pairs, dev_pairs, dev = policy_and_pairs(run)
    autocast = trainer.autocast_context(config, run.device_type)

    # The reference, built before fit restores any checkpoint, so it is always the starting model. By default
    # its log-probabilities are computed once, now (it never changes, so the loss is the same and each step
    # skips a forward pass). --live_reference recomputes them every step: with LoRA on the same network with
    # its adapters off, with FFT on a frozen copy.
    weights_id = weights_fingerprint(policy)
    ref_chosen, ref_rejected = cached_reference_logps(policy, pairs, config, autocast, config["cache_dir"],
                                                      weights_id, "train")
    dev_ref = cached_reference_logps(policy, dev_pairs, config, autocast, config["cache_dir"], weights_id, "dev")
    lengths = [len(p.chosen) + len(p.rejected) for p in pairs]
    first = trainer.epoch_batches(lengths, config, 0, run.world_size)[0]
    check_reference(policy, [pairs[i] for i in first], ref_chosen[first], ref_rejected[first], config, autocast)
    reference = None
    if config["live_reference"]:
        reference = policy if config["lora_r"] else copy.deepcopy(policy).requires_grad_(False).eval()

    def loss_fn(model, part, batch):
        chosen = [pairs[i].chosen for i in part]
        policy_chosen, policy_rejected = concatenated_logps(model, chosen, [pairs[i].rejected for i in part], device)
        if reference is None:
            reference_chosen, reference_rejected = ref_chosen[part], ref_rejected[part]
        else:
            with adapters_off(reference) if config["lora_r"] else nullcontext():
                reference_chosen, reference_rejected = reference_logps(reference, [pairs[i] for i in part], config,
                                                                       autocast)
        losses, _, _ = pair_losses(policy_chosen, policy_rejected, reference_chosen.to(device),
                                   reference_rejected.to(device), [pairs[i] for i in part], config)
        if config["rpo_alpha"]:  # 0: plain DPO, not even computed differently
            losses = rpo_loss(losses, average_logps(policy_chosen, chosen), config["rpo_alpha"])
        return losses.sum() / len(batch)  # this part's share of the mean over the whole batch's pairs

    def dev_metrics(model):
        return {**evaluate(model, config["task"], dev, config, device),
                **preference_metrics(model, dev_pairs, *dev_ref, config, autocast)}

    regime = "sft_dpo" if is_sft_run(config["init_from"]) else "rpo" if config["rpo_alpha"] else "dpo"
    extra = {"beta": config["beta"], "reference": "live" if reference is not None else "precomputed"}
    rpo = f", RPO alpha={config['rpo_alpha']}" if config["rpo_alpha"] else ""
    title = (f"{config['task']} DPO ({trainer.describe(config)}, {config['loss_type']} loss, beta={config['beta']}"
             f"{rpo}, {extra['reference']} reference) of {config['init_from']}")
    return trainer.fit(run, policy, lengths, loss_fn, dev_metrics, regime, title,
                       {**extra, **rejections_summary(run, pairs)})


def main(argv=None):
    trainer.main(train, SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
