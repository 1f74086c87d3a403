"""Beyond DPO: cDPO, IPO, RPO, SimPO and ORPO against their formulas computed by hand in float64; the exact equalities
(cDPO at eps = 0 and RPO at alpha = 0 are DPO); answers with no tokens; the step-0 check for each loss; LoRA+'s
learning rates at every step and through a resume; each variant from the command line; bad values."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import preferences
import train_dpo
import train_orpo
import train_sft
import flags
import trainer
from conftest import tiny_config
from data.batching import Example
from fileio import read_safetensors
from lora import apply_lora
from checkpoint import from_pretrained
from model import GPT
from test_train import settings, tiny_dir, weights, write_learnable_quora  # noqa: F401 (tiny_dir: a fixture)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def draws(seed, n=6, low=-9.0, high=-0.2):
    """n float64 log-probabilities, uniform in [low, high]."""
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """24 training pairs of test_train's learnable task, 4 dev pairs: runs of a few steps, scored in no time."""
    directory = tmp_path_factory.mktemp("small")
    write_learnable_quora(directory / "quora-train.csv", 24, seed=5)
    write_learnable_quora(directory / "quora-dev.csv", 4, seed=6)
    return directory


# -----------------------------------------------------------------------------
# the objectives, by hand


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_dpo_and_cdpo_by_hand(beta, eps):
    pc, pr, rc, rr = draws(1), draws(2), draws(3), draws(4)
    losses, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)


def test_cdpo_with_no_smoothing_is_dpo_exactly():
    pc, pr = draws(5).float().requires_grad_(), draws(6).float().requires_grad_()
    rc, rr = draws(7).float(), draws(8).float()
    cdpo, _, _ = train_dpo.dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", label_smoothing=0.0)
    grads = torch.autograd.grad(cdpo.sum(), (pc, pr))
    dpo = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))  # Rafailov et al.'s eq. 7, written out
    assert torch.equal(cdpo, dpo)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(dpo.sum(), (pc, pr))))


def test_cdpo_is_dpo_on_labels_flipped_with_probability_eps():
    """The expected DPO loss when the label is right with probability 1 - eps and flipped with probability eps."""
    pc, pr, rc, rr = draws(9), draws(10), draws(11), draws(12)
    dpo = train_dpo.dpo_loss(pc, pr, rc, rr, 0.5)[0]
    flipped = train_dpo.dpo_loss(pr, pc, rr, rc, 0.5)[0]
    assert torch.allclose(train_dpo.dpo_loss(pc, pr, rc, rr, 0.5, label_smoothing=0.2)[0], 0.8 * dpo + 0.2 * flipped)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_by_hand(beta):
    pc, pr, rc, rr = draws(13), draws(14), draws(15), draws(16)
    losses, _, _ = train_dpo.dpo_loss(pc, pr, rc, rr, beta, "ipo")
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    # its minimum: a margin of exactly 1/(2 beta), not an ever larger one
    zero = torch.zeros(1, dtype=torch.float64)
    assert train_dpo.dpo_loss(zero + 1 / (2 * beta), zero, zero, zero, beta, "ipo")[0].item() == 0.0


def test_unknown_loss_types_and_smoothed_ipo_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="'hinge'"):
        train_dpo.dpo_loss(x, x, x, x, 0.1, "hinge")
    with pytest.raises(ValueError, match="ipo without label smoothing"):
        train_dpo.dpo_loss(x, x, x, x, 0.1, "ipo", 0.1)


def test_odds_ratio_loss_by_hand():
    chosen, rejected = draws(17, low=-6.0, high=-0.01), draws(18, low=-6.0, high=-0.01)
    losses = train_orpo.odds_ratio_loss(chosen, rejected)
    for i in range(len(chosen)):
        pw, pl = math.exp(chosen[i].item()), math.exp(rejected[i].item())
        log_odds_ratio = (math.log(pw) - math.log(1 - pw)) - (math.log(pl) - math.log(1 - pl))
        assert losses[i].item() == pytest.approx(-log_sigmoid(log_odds_ratio), rel=1e-10)


def test_odds_ratio_loss_stays_finite_for_answers_the_model_is_sure_of():
    x = torch.tensor([0.0, -1e-12, -1e-8, -1e-6, -0.5], requires_grad=True)  # 0: an answer with no tokens
    losses = train_orpo.odds_ratio_loss(x, torch.full_like(x, -2.0))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(x.grad).all()
    assert (losses[1:] >= losses[:-1]).all() and losses[-2] < losses[-1]  # surer of the chosen answer: lower loss
    # log1p(-exp(x)), as TRL writes it, would give log 0 = -inf here: p rounds to 1 in float32
    assert torch.isinf(torch.log1p(-torch.exp(x.detach()[2])))


def test_orpo_loss_by_hand():
    chosen, rejected = draws(19, low=-6.0, high=-0.01), draws(20, low=-6.0, high=-0.01)
    losses = train_orpo.orpo_loss(chosen, rejected, orpo_lambda=0.1)
    for i in range(len(chosen)):
        pw, pl = math.exp(chosen[i].item()), math.exp(rejected[i].item())
        log_odds_ratio = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        assert losses[i].item() == pytest.approx(-chosen[i].item() - 0.1 * log_sigmoid(log_odds_ratio), rel=1e-10)


def test_rpo_loss_by_hand():
    dpo, chosen_avg = draws(21, low=0.1, high=2.0), draws(22)
    for alpha in (0.5, 1.0):
        expected = [d - alpha * c for d, c in zip(dpo.tolist(), chosen_avg.tolist())]
        assert train_dpo.rpo_loss(dpo, chosen_avg, alpha).tolist() == pytest.approx(expected, rel=1e-12)


# -----------------------------------------------------------------------------
# per-token averages, and answers with no tokens


def test_average_logps_divide_by_each_answers_target_tokens_and_define_none_as_zero(tiny_model):
    examples = [Example([5, 6, 7], [8, 9, 10]), Example([1], [2]), Example([], [11, 12, 13]), Example([4, 4], [])]
    sums = torch.tensor([-6.0, -2.0, -5.0, 0.0], dtype=torch.float64)
    # 3 targets; 1; a prompt-less sonnet's first token has nothing to predict it, so 2; none: 0/0 defined as 0
    assert preferences.average_logps(sums, examples).tolist() == [-2.0, -2.0, -2.5, 0.0]
    # through the model: an empty rejected answer sums to 0, and IPO and ORPO stay finite, gradients too
    chosen, rejected = [Example([5, 6, 7], [8, 9]), Example([3], [2])], [Example([5, 6, 7], []), Example([3], [4])]
    policy_chosen, policy_rejected = train_dpo.concatenated_logps(tiny_model.train(), chosen, rejected, "cpu")
    assert policy_rejected[0].item() == 0.0
    pairs = [preferences.Pair(c, r) for c, r in zip(chosen, rejected)]
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "loss_type": "ipo"}
    ipo, _, _ = train_dpo.pair_losses(policy_chosen, policy_rejected, policy_chosen.detach() - 1,
                                      policy_rejected.detach(), pairs, config)
    orpo = train_orpo.orpo_loss(preferences.average_logps(policy_chosen, chosen),
                                preferences.average_logps(policy_rejected, rejected), 0.1)
    (ipo.sum() + orpo.sum()).backward()
    assert torch.isfinite(ipo).all() and torch.isfinite(orpo).all()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_ipo_reads_per_token_averages_and_dpo_sums():
    chosen, rejected = [Example([1], [2, 3, 4, 5])], [Example([1], [6, 7])]
    pairs = [preferences.Pair(chosen[0], rejected[0])]
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-8.0, -6.0, -12.0, -5.0))
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1}
    h_sum, h_avg = (-8 + 12) - (-6 + 5), (-8 + 12) / 4 - (-6 + 5) / 2
    dpo = train_dpo.pair_losses(pc, pr, rc, rr, pairs, config)[0]
    ipo = train_dpo.pair_losses(pc, pr, rc, rr, pairs, {**config, "loss_type": "ipo", "beta": 0.5})[0]
    assert dpo.item() == pytest.approx(-log_sigmoid(0.1 * h_sum)) and ipo.item() == pytest.approx((h_avg - 1) ** 2)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.3), (0.1, 0.0)])
def test_simpo_by_hand(beta, gamma):
    """L = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma) (Meng et al. 2024, eq. 6)."""
    chosen, rejected = draws(10), draws(11)
    losses, chosen_rewards, rejected_rewards = train_dpo.simpo_loss(chosen / 3, rejected / 5, beta, gamma)
    for k in range(6):
        margin = beta * chosen[k].item() / 3 - beta * rejected[k].item() / 5 - gamma
        assert losses[k].item() == pytest.approx(-log_sigmoid(margin), rel=1e-12)
        assert chosen_rewards[k].item() == pytest.approx(beta * chosen[k].item() / 3, rel=1e-12)


def test_simpo_reads_per_token_averages_and_every_option_reaches_it(monkeypatch):
    """pair_losses passes each loss option explicitly: a SETTINGS default that differs from anything the loss
    function would assume reaches it (here simpo_gamma 0.7), and --beta's default under simpo is 2.0."""
    monkeypatch.setitem(train_dpo.SETTINGS, "simpo_gamma", (0.7, float, None, "a default only this test uses"))
    config = train_dpo.check_config({"task": "paraphrase", "device": "cpu", "loss_type": "simpo",
                                     "out_dir": None, "init_from": "gpt2"})
    assert (config["beta"], config["simpo_gamma"]) == (2.0, 0.7)
    pairs = [preferences.Pair(Example([1, 2], [3, 4, 5, 6]), Example([1, 2], [7, 8]))]
    pc, pr = torch.tensor([-8.0], dtype=torch.float64), torch.tensor([-6.0], dtype=torch.float64)
    loss = train_dpo.pair_losses(pc, pr, None, None, pairs, config)[0]
    assert loss.item() == pytest.approx(-log_sigmoid(2.0 * -8 / 4 - 2.0 * -6 / 2 - 0.7), rel=1e-12)


def test_simpo_trains_with_no_reference_pass_and_no_step_0_check(tiny_dir, small_data, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free loss computed reference log-probabilities or checked them")

    monkeypatch.setattr(train_dpo, "cached_reference_logps", refuse)
    monkeypatch.setattr(train_dpo, "check_reference", refuse)
    results = train_dpo.train(settings(tiny_dir, small_data, tmp_path / "simpo", loss_type="simpo", epochs=1,
                                       train_limit=8, batch_size=4))
    assert results["reference"] == "none" and results["regime"] == "simpo" and results["beta"] == 2.0
    assert not list((tmp_path / "simpo").glob("reference-*"))
    assert math.isfinite(results["metrics"]["preference_loss"]) and 0 <= results["metrics"]["reward_accuracy"] <= 1
    with pytest.raises(train_dpo.InputError, match="--live_reference: --loss_type simpo has no reference model"):
        train_dpo.check_config(settings(tiny_dir, small_data, tmp_path / "x", loss_type="simpo", live_reference=True))


# -----------------------------------------------------------------------------
# the step-0 check, for each loss


@pytest.mark.parametrize("loss_type, eps, expected", [("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.2, math.log(2)),
                                                      ("ipo", 0.0, (1 / (2 * 0.1)) ** 2)])
def test_step_0_check_holds_for_each_loss_and_catches_a_wrong_reference(loss_type, eps, expected):
    from contextlib import nullcontext
    torch.manual_seed(0)
    policy, other = GPT(tiny_config()), GPT(tiny_config())
    pairs = [preferences.Pair(Example([1, 2, 3], [4, 5]), Example([1, 2, 3], [6])),
             preferences.Pair(Example([7, 8], [9]), Example([7, 8], [10, 11, 12]))]
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "device": "cpu", "loss_type": loss_type, "label_smoothing": eps}
    ref = train_dpo.scored_logps(policy, pairs, config, nullcontext())
    losses = train_dpo.pair_losses(*ref, *ref, pairs, config)[0]
    assert losses.tolist() == pytest.approx([expected] * 2)  # the value the check expects, from the loss itself
    train_dpo.check_reference(policy, pairs, *ref, config, nullcontext())
    wrong = train_dpo.scored_logps(other, pairs, config, nullcontext())
    with pytest.raises(train_dpo.InputError, match=rf"at step 0 the {loss_type} loss is .* \(expected "
                                                   rf"{expected:.4f}.*the reference is not the model"):
        train_dpo.check_reference(policy, pairs, *wrong, config, nullcontext())


# -----------------------------------------------------------------------------
# RPO at alpha = 0 is DPO, down to the weights


def test_rpo_with_alpha_0_is_dpo_down_to_the_final_weights(tiny_dir, small_data, tmp_path, monkeypatch):
    common = dict(epochs=1, train_limit=16, batch_size=4)
    dpo = train_dpo.train(settings(tiny_dir, small_data, tmp_path / "dpo", **common))
    zero = train_dpo.train(settings(tiny_dir, small_data, tmp_path / "zero", rpo_alpha=0.0, **common))
    called, rpo_loss = [], train_dpo.rpo_loss
    monkeypatch.setattr(train_dpo, "rpo_loss", lambda *args: called.append(1) or rpo_loss(*args))
    one = train_dpo.train(settings(tiny_dir, small_data, tmp_path / "one", rpo_alpha=1.0, **common))
    a, b, c = (weights(tmp_path / name / "last") for name in ("dpo", "zero", "one"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a) and called  # alpha = 1 does change the training
    assert (dpo["regime"], zero["regime"], one["regime"]) == ("dpo", "dpo", "rpo")
    assert one["config"]["rpo_alpha"] == 1.0 and dpo["reference"] == "precomputed"



# -----------------------------------------------------------------------------
# LoRA+ and rsLoRA in training


def test_lora_plus_puts_b_in_its_own_group_at_ratio_times_lr(tiny_model):
    apply_lora(tiny_model, r=2, alpha=4)
    optimizer = trainer.configure_optimizer(tiny_model, 1e-3, 0.1, "cpu", lora_plus_ratio=16)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed, a_group, b_group = optimizer.param_groups
    assert decayed["params"] == [] and b_group["lr"] == 16e-3 and a_group["lr"] == 1e-3
    assert sorted(names[id(p)] for p in b_group["params"]) == sorted(n for n in names.values() if n.endswith("lora_B"))
    assert all(names[id(p)].endswith("lora_A") for p in a_group["params"]) and len(a_group["params"]) == 8
    assert b_group["weight_decay"] == 0.0 and (a_group["lr_scale"], b_group["lr_scale"]) == (1.0, 16)
    plain = trainer.configure_optimizer(GPT(tiny_config()), 1e-3, 0.1, "cpu", lora_plus_ratio=16)
    assert len(plain.param_groups) == 2  # full fine-tuning has no B


class Interrupted(Exception):
    pass


CONFIGURE_OPTIMIZER = trainer.configure_optimizer


def record_learning_rates(monkeypatch, seen, stop_at=None):
    """Record every group's learning rate as each optimizer step begins; raise Interrupted at step stop_at."""
    def spy(*args, **kwargs):
        optimizer = CONFIGURE_OPTIMIZER(*args, **kwargs)

        def hook(opt, *_):
            if stop_at is not None and len(seen) == stop_at:
                raise Interrupted
            seen.append([(g["lr"], g["lr_scale"], len(g["params"])) for g in opt.param_groups])

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(trainer, "configure_optimizer", spy)


def test_lora_plus_keeps_its_ratio_at_every_step_and_through_a_resume(tiny_dir, small_data, tmp_path, monkeypatch):
    config = settings(tiny_dir, small_data, tmp_path / "straight", epochs=2, train_limit=24, batch_size=4,
                      lora_r=4, lora_plus_ratio=16.0, warmup=0.2, lr=1e-3, dropout=0.1, checkpoint_every=2)
    straight = []
    record_learning_rates(monkeypatch, straight)
    train_sft.train(config)
    total = len(straight)
    assert total == 12
    for step, groups in enumerate(straight):
        lr = trainer.lr_at(step, total, 1e-3, 0.2, 0.1)
        assert [g[0] for g in groups] == pytest.approx([lr, lr, 16 * lr], rel=1e-12)
        assert [g[2] for g in groups] == [0, 8, 8]  # nothing decayed; 8 A (4 Linears, 2 blocks); 8 B
    assert len({g[0][0] for g in straight}) > 3  # the schedule did move
    # stopped after step 5 (the checkpoint is step 4's), then resumed: the same rates, the same final weights
    interrupted, resumed = [], []
    record_learning_rates(monkeypatch, interrupted, stop_at=5)
    with pytest.raises(Interrupted):
        train_sft.train({**config, "out_dir": str(tmp_path / "resumed")})
    record_learning_rates(monkeypatch, resumed)
    train_sft.train({**config, "out_dir": str(tmp_path / "resumed"), "resume": True})
    assert interrupted[:4] + resumed == straight
    a = read_safetensors(tmp_path / "straight" / "last" / "adapter.safetensors")[0]
    b = read_safetensors(tmp_path / "resumed" / "last" / "adapter.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_rslora_run_saves_and_reloads_its_scaling(tiny_dir, small_data, tmp_path):
    from checkpoint import load_model
    train_sft.train(settings(tiny_dir, small_data, tmp_path / "rs", epochs=1, train_limit=8, lora_r=4,
                             lora_alpha=8.0, lora_rslora=True))
    folder = tmp_path / "rs" / "last"
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    tensors, _ = read_safetensors(folder / "adapter.safetensors")
    base, tuned = from_pretrained(tiny_dir).state_dict(), load_model(folder).state_dict()
    name = "transformer.h.0.mlp.c_fc"
    delta = tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]
    assert delta.abs().max() > 0
    assert torch.allclose(tuned[f"{name}.weight"], base[f"{name}.weight"] + 8.0 / math.sqrt(4) * delta, atol=1e-6)


# -----------------------------------------------------------------------------
# every variant from the command line alone; bad values before any model loads


def command_line(tiny_dir, data, out):
    return ["--task", "paraphrase", "--init_from", str(tiny_dir), "--data_dir", str(data), "--out_dir", str(out),
            "--device", "cpu", "--epochs", "1", "--batch_size", "4", "--train_limit", "8", "--lr", "1e-3"]


LORA_FLAGS = ["--lora_r", "4", "--lora_rslora", "--lora_plus_ratio", "16"]
LORA_CONFIG = {"lora_r": 4, "lora_rslora": True, "lora_plus_ratio": 16.0}


@pytest.mark.parametrize("script, flags, regime, config", [
    (train_dpo, ["--loss_type", "ipo"], "dpo", {"loss_type": "ipo"}),
    (train_dpo, ["--label_smoothing", "0.1"], "dpo", {"label_smoothing": 0.1}),
    (train_dpo, ["--rpo_alpha", "1"], "rpo", {"rpo_alpha": 1.0}),
    (train_dpo, ["--loss_type", "simpo", "--simpo_gamma", "0.5"], "simpo", {"simpo_gamma": 0.5, "beta": 2.0}),
    (train_orpo, [], "orpo", {"orpo_lambda": 0.1}),
    (train_orpo, ["--orpo_lambda", "0.5", "--lora_r", "4"], "orpo", {"orpo_lambda": 0.5, "lora_r": 4}),
    (train_dpo, LORA_FLAGS, "dpo", LORA_CONFIG),
    (train_sft, LORA_FLAGS, "sft", LORA_CONFIG),
])
def test_each_variant_runs_from_the_command_line(script, flags, regime, config, tiny_dir, small_data, tmp_path):
    script.main(command_line(tiny_dir, small_data, tmp_path / "run") + flags)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["regime"] == regime and results["steps"] == 2
    assert all(math.isfinite(h["train_loss"]) for h in results["history"])
    assert {k: results["config"][k] for k in config} == config
    if script is train_orpo or "simpo" in flags:
        assert results["reference"] == "none" and not list((tmp_path / "run").glob("reference-*"))
    if script is train_orpo:
        assert math.isfinite(results["metrics"]["orpo_loss"]) and 0 <= results["metrics"]["odds_accuracy"] <= 1


def test_help_names_each_variants_source(capsys):
    for script, sources in ((train_dpo, ["Azar et al. 2023", "Mitchell 2023", "Pang et al. 2024", "Kalajdzievski",
                                         "Meng et al. 2024", "2.0-2.5",
                                         "Hayou et al. 2024"]), (train_orpo, ["Hong et al. 2024", "0.1"])):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(source in text for source in sources), [s for s in sources if s not in text]


@pytest.mark.parametrize("script, flags, message", [
    (train_dpo, ["--label_smoothing", "0.7"], "--label_smoothing 0.7: must be in [0, 0.5)"),
    (train_dpo, ["--label_smoothing", "0.5"], "--label_smoothing 0.5: must be in [0, 0.5)"),
    (train_dpo, ["--label_smoothing", "-0.1"], "--label_smoothing -0.1: must be in [0, 0.5)"),
    (train_dpo, ["--loss_type", "hinge"], "--loss_type hinge: must be sigmoid, ipo or simpo"),
    (train_dpo, ["--loss_type", "ipo", "--label_smoothing", "0.1"],
     "--label_smoothing 0.1: only for --loss_type sigmoid"),
    (train_dpo, ["--rpo_alpha", "-1"], "--rpo_alpha -1.0: must be 0 or more"),
    (train_dpo, ["--rpo_alpha", "inf"], "--rpo_alpha inf: must be 0 or more"),
    (train_orpo, ["--orpo_lambda", "0"], "--orpo_lambda 0.0: must be a positive number"),
    (train_orpo, ["--lora_plus_ratio", "16"], "--lora_plus_ratio 16.0: needs --lora_r"),
    (train_sft, ["--lora_rslora"], "--lora_rslora: needs --lora_r"),
    (train_sft, ["--lora_r", "4", "--lora_plus_ratio", "0"], "--lora_plus_ratio 0.0: must be a positive number"),
])
def test_bad_values_are_one_line_errors_before_any_model_loads(script, flags, message, tiny_dir, small_data,
                                                                tmp_path, monkeypatch):
    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(trainer, "load_policy", no_model)
    with pytest.raises(SystemExit) as exit_info:
        script.main(command_line(tiny_dir, small_data, tmp_path / "out") + flags)
    assert str(exit_info.value).startswith("error: " + message), str(exit_info.value)
    assert "\n" not in str(exit_info.value)
