"""
ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model") of GPT-2, FFT or LoRA.

    python train_orpo.py --task paraphrase                       # from pretrained gpt2: no SFT stage first
    python train_orpo.py --task sonnet --lora_r 8 --orpo_lambda 0.1

One loss on DPO's pairs (preferences.py), SFT on the chosen answer plus a penalty on the rejected one, and no
reference model (no reference pass, no step-0 check):

    L_ORPO = NLL(y_w|x) + lambda * L_OR,      L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )

with NLL the chosen answer's per-token negative log-likelihood and odds(y|x) = p / (1 - p), p = exp(the answer's
per-token average log-probability).
"""

import math

import torch
import torch.nn.functional as F

import flags
import preferences
import trainer
import train_dpo
from flags import POSITIVE
from preferences import average_logps
from train_dpo import concatenated_logps, scored_logps

# -----------------------------------------------------------------------------
# settings: trainer.py's (GPT-2's dropout 0.1, as in SFT: with no reference, dropout biases nothing), and these
SETTINGS = {
    **trainer.SETTINGS,
    "init_from": ("gpt2", str, None, "a GPT-2 name, model folder or run's out_dir (ORPO needs no SFT stage first)"),
    "out_dir": (None, str, None, "where this run writes; default out/orpo-{task}-{fft|lora}"),
    "orpo_lambda": (0.1, float, POSITIVE, "lambda, the odds-ratio term's weight (the paper's 0.1; TRL's "
                                          "ORPOConfig.beta)"),
    "cache_dir": (None, str, None, "where sampled sonnet rejections are cached; default out_dir"),
    "rejections_from": train_dpo.SETTINGS["rejections_from"],
}


# -----------------------------------------------------------------------------
# the loss


def odds_ratio_loss(chosen_avg_logps, rejected_avg_logps):
    """ORPO's odds-ratio loss of each pair (Hong et al. 2024, eqs. 4-7), from (B,) per-token average
    log-probabilities x; returns (B,):

        L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),   log odds(y) = log p - log(1 - p),   p = exp(x)

    log(1 - exp(x)) is Maechler 2012's stable log1mexp, and x is capped at log(1 - eps): a sure answer, or one
    with no tokens (average 0), has a large finite log odds, never inf/NaN."""
    def log_odds(x):
        x = x.clamp(max=math.log1p(-torch.finfo(x.dtype).eps))
        log1mexp = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
        return x - log1mexp

    return -F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, orpo_lambda):
    """ORPO's loss of each pair (Hong et al. 2024, eq. 6): the chosen answer's per-token NLL (eq. 2) plus lambda
    times the odds-ratio loss. Inputs (B,) per-token average log-probabilities; returns (B,).
        L_ORPO = -chosen_avg_logp + lambda * L_OR                 (the NLL is over the answer's tokens only)"""
    return -chosen_avg_logps + orpo_lambda * odds_ratio_loss(chosen_avg_logps, rejected_avg_logps)


@torch.no_grad()
def orpo_metrics(model, pairs, config, autocast):
    """Over the whole dev set: the ORPO loss and its two terms, how often the chosen answer's odds are the
    higher (odds_accuracy), and both answers' log-probabilities."""
    chosen, rejected = scored_logps(model, pairs, config, autocast)  # the model's, in eval mode
    chosen_avg, rejected_avg = (average_logps(chosen, [p.chosen for p in pairs]),
                                average_logps(rejected, [p.rejected for p in pairs]))
    odds = odds_ratio_loss(chosen_avg, rejected_avg)
    return {"orpo_loss": orpo_loss(chosen_avg, rejected_avg, config["orpo_lambda"]).mean().item(),
            "chosen_nll": -chosen_avg.mean().item(), "odds_ratio_loss": odds.mean().item(),
            "odds_accuracy": (odds < math.log(2)).float().mean().item(),  # log odds(y_w) > log odds(y_l)
            "chosen_logp": chosen.mean().item(), "rejected_logp": rejected.mean().item()}


# -----------------------------------------------------------------------------
# training


def train(config):
    """Run ORPO as `config` (a dict of SETTINGS) says; returns what it writes to out_dir/results.json."""
    run, model, pairs, dev_pairs, dev = preferences.start(trainer.check_config(config, SETTINGS, prefix="orpo"))
    config, device = run.config, run.device
    autocast = trainer.autocast_context(config, run.device_type)

    def loss_fn(model, micro_batch, batch):
        chosen, rejected = [pairs[i].chosen for i in micro_batch], [pairs[i].rejected for i in micro_batch]
        chosen_logps, rejected_logps = concatenated_logps(model, chosen, rejected, device, config["logprobs"])
        losses = orpo_loss(average_logps(chosen_logps, chosen), average_logps(rejected_logps, rejected),
                           config["orpo_lambda"])
        return losses.sum() / len(batch), {}  # this micro-batch's share of the mean over the whole batch's pairs

    def dev_metrics(model):
        return orpo_metrics(model, dev_pairs, config, autocast)

    title = f"ORPO ({trainer.describe(config)}, lambda={config['orpo_lambda']}, no reference model)"
    extra = {"orpo_lambda": config["orpo_lambda"], "reference": "none"}
    return preferences.fit(run, model, pairs, dev, loss_fn, dev_metrics, "orpo", title, extra)


def main(argv=None):
    flags.main(train, SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
