"""
Direct Preference Optimization (DPO, Rafailov et al. 2023) of GPT-2 on one of the two tasks, FFT or LoRA.

    python train_dpo.py --task paraphrase                                   # DPO-only: from pretrained gpt2
    python train_dpo.py --task paraphrase --init_from out/sft-paraphrase-fft # SFT->DPO: from an SFT run
    python train_dpo.py --task sonnet --lora_r 8 --beta 0.1                 # LoRA

DPO trains on pairs (x, y_w, y_l) of preferences.py: a prompt, a chosen and a rejected answer. No reward model:

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where pi is the policy being trained and ref the frozen model it started from; log pi(y|x) is SFT's summed
log-likelihood (train_sft.batch_logprobs). An answer's implicit reward is beta * (log pi - log ref): DPO raises
the chosen one's above the rejected one's, and beta sets how far from the reference the policy may move.
Variants, beside dpo_loss with their papers: cDPO (--label_smoothing), IPO (--loss_type ipo), RPO (--rpo_alpha)
and SimPO (--loss_type simpo, reference-free). ORPO, also reference-free, is train_orpo.py.
"""

import copy
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import flags
import preferences
import trainer
from checkpoint import is_sft_run
from data.batching import batch_indices, collate
from eval import eval_mode
from fileio import InputError, fingerprint, read_cache, read_safetensors, write_safetensors
from flags import NON_NEGATIVE, POSITIVE, between, one_of
from lora import lora_layers
from preferences import average_logps, weights_fingerprint
from train_sft import batch_logprobs

# -----------------------------------------------------------------------------
# settings: trainer.py's, with these changes and additions
LOSS_TYPES = ("sigmoid", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)  # losses with no reference model: no reference pass, no step-0 check
SETTINGS = {
    **trainer.SETTINGS,
    "init_from": ("gpt2", str, None, "DPO-only: a GPT-2 name or model folder; SFT->DPO: an SFT run's out_dir"),
    "out_dir": (None, str, None, "where this run writes; default out/dpo-{task}-{fft|lora}"),
    "dropout": (0.0, float, between(0, 0.999), "off (as in the DPO authors' code): dropout noise in log pi - log "
                "ref biases the loss, and at step 0 the policy must compute the reference's function"),
    "loss_type": ("sigmoid", str, one_of(*LOSS_TYPES), "sigmoid: DPO; ipo: IPO (Azar et al. 2023), on per-token "
                  "averages as in its paper; simpo: SimPO (Meng et al. 2024), reference-free"),
    "beta": (None, float, POSITIVE, "the strength of the preference: default 0.1 (the DPO paper's) for sigmoid and "
                                    "ipo, 2.0 for simpo (SimPO's recommended 2.0-2.5)"),
    "label_smoothing": (0.0, float, (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
                        "cDPO (Mitchell 2023): the share eps of labels taken to be flipped; 0 = DPO"),
    "rpo_alpha": (0.0, float, NON_NEGATIVE, "RPO (Pang et al. 2024): add alpha * the chosen answer's per-token NLL; "
                                            "0 = off (the paper's is 1)"),
    "simpo_gamma": (1.0, float, NON_NEGATIVE, "SimPO's target reward margin gamma (Meng et al. 2024, eq. 6); 1.0 is "
                                              "0.5 * beta, the gamma/beta ratio of the authors' released configs"),
    "live_reference": (False, bool, None, "compute the reference's log-probabilities every step, not once before "
                                          "training (the same loss, for checking; slower)"),
    "cache_dir": (None, str, None, "where reference log-probabilities and rejections are cached; default out_dir"),
    "rejections_from": (None, str, None, "sonnets: sample the rejections from this model or run, not the starting "
                                         "model (e.g. one set for every regime)"),
}

# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """The loss of each pair, and the implicit rewards beta * (log pi - log ref). With the margin of log-ratios
    h = (pi_c - ref_c) - (pi_r - ref_r):

        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     eps = label_smoothing
                 eps = 0: DPO (Rafailov et al. 2023, eq. 7); eps > 0: cDPO (Mitchell 2023, "A note on DPO with
                 noisy preferences"), DPO's expected loss if each label is flipped with probability eps
        ipo      (h - 1 / (2 beta))^2          IPO (Azar et al. 2023, eq. 17): the margin is pulled to 1/(2 beta)

    Inputs (B,): summed log-probabilities for DPO, per-token averages for IPO (the IPO paper's). Returns (losses,
    chosen_rewards, rejected_rewards), each (B,); the rewards are detached (for logging, not gradients)."""
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
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta, gamma):
    """SimPO (Meng et al. 2024, eq. 6): an answer's reward is beta times its per-token average log-probability,
    and the chosen one's must beat the rejected one's by gamma. No reference model. Inputs (B,), output as dpo_loss:

        L_SimPO = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )"""
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def rpo_loss(losses, policy_chosen_avg_logps, alpha):
    """RPO (Pang et al. 2024, eq. 3): + alpha * the chosen answer's per-token NLL, which holds its likelihood up
    (DPO alone often lowers it):    L_RPO = L_DPO - alpha * log pi(y_w|x) / |y_w|                     all (B,)"""
    return losses - alpha * policy_chosen_avg_logps


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, pairs, config):
    """The loss --loss_type names, on what it reads (summed log-probabilities, or per-token averages for IPO and
    SimPO), with every option passed explicitly. ref_* are None for a reference-free loss."""
    if config["loss_type"] in ("ipo", "simpo"):
        chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
        policy_chosen, policy_rejected = average_logps(policy_chosen, chosen), average_logps(policy_rejected, rejected)
    if config["loss_type"] == "simpo":
        return simpo_loss(policy_chosen, policy_rejected, beta=config["beta"], gamma=config["simpo_gamma"])
    if config["loss_type"] == "ipo":
        ref_chosen, ref_rejected = average_logps(ref_chosen, chosen), average_logps(ref_rejected, rejected)
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=config["beta"],
                    loss_type=config["loss_type"], label_smoothing=config["label_smoothing"])


def concatenated_logps(model, chosen, rejected, device, path="auto"):
    """log p of the chosen and the rejected answers (lists of Examples) in one forward pass over 2B rows."""
    logps = batch_logprobs(model, collate(chosen + rejected), device, path)
    return logps[:len(chosen)], logps[len(chosen):]


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
def scored_logps(model, pairs, config, autocast):
    """log p(chosen | x) and log p(rejected | x) of every pair under `model` in eval mode: (N,), (N,) float32.
    The reference's before training, and the policy's on the dev set."""
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for idx in batch_indices([len(p.chosen) + len(p.rejected) for p in pairs], config["eval_batch_size"]):
        with eval_mode(model), autocast:
            c, r = concatenated_logps(model, [pairs[i].chosen for i in idx], [pairs[i].rejected for i in idx],
                                      config["device"], config["logprobs"])
        chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    return chosen, rejected


def cached_reference_logps(model, pairs, config, autocast, weights_id, name):
    """scored_logps of the reference, kept in cache_dir under a fingerprint of its weights, the pairs and the
    dtype: a rerun or another condition reads them back, a changed model or data set never a stale file."""
    device_type = config["device"].split(":")[0]
    key = fingerprint(weights_id, [(p.chosen.prompt, p.chosen.target, p.rejected.target) for p in pairs],
                      "gpt2-bpe", str(getattr(autocast, "fast_dtype", "float32")), device_type)
    path = Path(config["cache_dir"]) / f"reference-{name}-{key}.safetensors"
    cached = read_cache(path, lambda p: read_safetensors(p)[0])
    if cached is not None:
        return cached["chosen"], cached["rejected"]
    chosen, rejected = scored_logps(model, pairs, config, autocast)
    write_safetensors(path, {"chosen": chosen, "rejected": rejected})
    return chosen, rejected


def check_reference(model, pairs, ref_chosen, ref_rejected, config, autocast):
    """At step 0 policy and reference are the same model, so every margin h must be 0 and the loss its value
    there: ln 2 for DPO and cDPO ((1 - eps) ln 2 + eps ln 2), (0 - 1/(2 beta))^2 for IPO. If not, the reference
    is not the starting model (after LoRA SFT, for instance, base GPT-2 is the wrong one)."""
    policy_chosen, policy_rejected = scored_logps(model, pairs, config, autocast)
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
    """Over the dev set: --loss_type's loss (without RPO's NLL), reward accuracy and margin, both rewards and
    log-probabilities. A falling chosen log-probability is no bug: DPO moves only the margin (RPO holds it up)."""
    chosen, rejected = scored_logps(model, pairs, config, autocast)
    losses, chosen_rewards, rejected_rewards = pair_losses(chosen, rejected, ref_chosen, ref_rejected, pairs, config)
    return {"preference_loss": losses.mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
            "chosen_logp": chosen.mean().item(), "rejected_logp": rejected.mean().item()}


# -----------------------------------------------------------------------------
# training


def check_config(config):
    """trainer.check_config's checks, DPO's, and --beta's default."""
    config = trainer.check_config(config, SETTINGS, prefix="dpo")
    if config["beta"] is None:
        config["beta"] = 2.0 if config["loss_type"] == "simpo" else 0.1
    if config["loss_type"] != "sigmoid" and config["label_smoothing"]:
        raise InputError(f"--label_smoothing {config['label_smoothing']}: only for --loss_type sigmoid (cDPO)")
    if config["loss_type"] in REFERENCE_FREE and config["live_reference"]:
        raise InputError(f"--live_reference: --loss_type {config['loss_type']} has no reference model")
    return config


def train(config):
    """Run DPO as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    run, policy, pairs, dev_pairs, dev = preferences.start(check_config(config))
    config, device = run.config, run.device
    autocast = trainer.autocast_context(config, run.device_type)

    # The reference is the model before fit restores any checkpoint: scored once, now, or every step with
    # --live_reference (LoRA: the same network, adapters off; FFT: a frozen copy). SimPO has none.
    reference, frozen, ref_chosen, ref_rejected, dev_ref = "none", None, None, None, (None, None)
    if config["loss_type"] not in REFERENCE_FREE:
        weights_id = weights_fingerprint(policy)
        ref_chosen, ref_rejected = cached_reference_logps(policy, pairs, config, autocast, weights_id, "train")
        dev_ref = cached_reference_logps(policy, dev_pairs, config, autocast, weights_id, "dev")
        sizes = [len(p.chosen) + len(p.rejected) for p in pairs]
        first = trainer.epoch_batches(sizes, config, 0, run.world_size)[0]
        check_reference(policy, [pairs[i] for i in first], ref_chosen[first], ref_rejected[first], config, autocast)
        reference = "precomputed"
    if config["live_reference"]:
        reference = "live"
        frozen = policy if config["lora_r"] else copy.deepcopy(policy).requires_grad_(False).eval()

    def reference_logps(items, micro_batch):
        if frozen is not None:
            with adapters_off(frozen) if config["lora_r"] else nullcontext():
                return (t.to(device) for t in scored_logps(frozen, items, config, autocast))
        if ref_chosen is not None:
            return ref_chosen[micro_batch].to(device), ref_rejected[micro_batch].to(device)
        return None, None

    def loss_fn(model, micro_batch, batch):
        items = [pairs[i] for i in micro_batch]
        chosen = [p.chosen for p in items]
        policy_chosen, policy_rejected = concatenated_logps(model, chosen, [p.rejected for p in items], device,
                                                            config["logprobs"])
        reference_chosen, reference_rejected = reference_logps(items, micro_batch)
        losses, chosen_rewards, rejected_rewards = pair_losses(policy_chosen, policy_rejected, reference_chosen,
                                                               reference_rejected, items, config)
        if config["rpo_alpha"]:  # 0: plain DPO, not even computed differently
            losses = rpo_loss(losses, average_logps(policy_chosen, chosen), config["rpo_alpha"])
        share = len(batch)  # this micro-batch's share of the mean over the whole batch's pairs
        return losses.sum() / share, {"reward_accuracy": (chosen_rewards > rejected_rewards).float().sum() / share,
                                      "reward_margin": (chosen_rewards - rejected_rewards).sum() / share}

    def dev_metrics(model):
        return preference_metrics(model, dev_pairs, *dev_ref, config, autocast)

    regime = ("sft_dpo" if is_sft_run(config["init_from"]) else "simpo" if config["loss_type"] == "simpo"
              else "rpo" if config["rpo_alpha"] else "dpo")
    rpo = f", RPO alpha={config['rpo_alpha']}" if config["rpo_alpha"] else ""
    title = (f"DPO ({trainer.describe(config)}, {config['loss_type']} loss, beta={config['beta']}{rpo}, "
             f"{reference} reference)")
    extra = {"beta": config["beta"], "reference": reference}
    return preferences.fit(run, policy, pairs, dev, loss_fn, dev_metrics, regime, title, extra)


def main(argv=None):
    flags.main(train, SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
