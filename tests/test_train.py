"""SFT and DPO: the loss functions against hand computations, the training loops on a tiny GPT-2 and a task it
can learn in seconds, resume after kill -9, exact gradient accumulation, and bad settings."""

import csv
import json
from contextlib import nullcontext
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import preferences
import train_dpo
import train_sft
import flags
import trainer
from conftest import ROOT, tiny_config
from data.batching import Example, collate
from data.sonnets import continuation_examples
from data.quora import read_quora
from data.tasks import load_task_data
from fileio import InputError, read_safetensors
from lora import apply_lora
from checkpoint import from_pretrained, load_model, save_pretrained
from model import GPT

# -----------------------------------------------------------------------------
# the pure functions


def test_dpo_loss_by_hand():
    beta = 0.5
    pc, pr, rc, rr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.5])
    losses, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: chosen ratio 0.5, rejected ratio -0.5 -> -log sigmoid(0.5 * 1.0); pair 1: -1.0 and 1.5 -> -log sigmoid(-1.25)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.25))])
    assert chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.75])


def test_dpo_loss_at_the_reference_is_ln2_and_its_gradient_prefers_the_chosen_answer():
    policy_chosen = torch.tensor([-4.0, -7.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0, -2.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(
        policy_chosen, policy_rejected, policy_chosen.detach(), policy_rejected.detach(), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert chosen_rewards.tolist() == [0.0, 0.0] and rejected_rewards.tolist() == [0.0, 0.0]
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # gradient descent moves against the gradient: up for the chosen log-prob, down for the rejected one
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()


def test_sequence_logprobs_against_a_per_token_loop():
    torch.manual_seed(0)
    examples = [Example([5, 6, 7], [8, 9]), Example([1], [2, 3, 4, 5]), Example([], [11, 12, 13])]
    batch = collate(examples, pad_id=49)  # a 50-token vocabulary; padding must never count
    logits = torch.randn(*batch.input_ids.shape, 50)
    got = train_sft.sequence_logprobs(logits, batch.input_ids, batch.loss_mask)
    for row, ex in enumerate(examples):
        tokens = ex.prompt + ex.target
        expected = 0.0
        for t in range(max(len(ex.prompt), 1), len(tokens)):  # each target token, predicted from position t - 1
            expected += F.log_softmax(logits[row, t - 1].double(), -1)[tokens[t]].item()
        assert got[row].item() == pytest.approx(expected, abs=1e-5)
    assert got.dtype == torch.float32
    assert train_sft.sequence_logprobs(logits.bfloat16(), batch.input_ids, batch.loss_mask).dtype == torch.float32


def test_logits_only_where_a_loss_reads_them_give_the_same_logprobs(tiny_model):
    torch.manual_seed(0)
    examples = [Example(torch.randint(0, 50257, (n,)).tolist(), torch.randint(0, 50257, (k,)).tolist())
                for n, k in ((7, 1), (3, 1), (12, 1), (5, 4), (0, 9))]
    batch = collate(examples)
    full = train_sft.sequence_logprobs(tiny_model(batch.input_ids), batch.input_ids, batch.loss_mask)
    assert torch.allclose(train_sft.batch_logprobs(tiny_model, batch), full, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [trainer.lr_at(s, 100, 1e-3, warmup=0.1, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_weight_decay_only_on_matrices_and_never_on_lora(tiny_model):
    apply_lora(tiny_model, r=2, alpha=4)
    optimizer = trainer.configure_optimizer(tiny_model, 1e-3, 0.1, "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["params"] == []  # LoRA: only A and B train, and they are not decayed
    assert len(plain["params"]) == 2 * 4 * 2  # A and B of 4 Linears in each of 2 blocks
    full = GPT(tiny_config())
    decayed, plain = trainer.configure_optimizer(full, 1e-3, 0.1, "cpu").param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


# -----------------------------------------------------------------------------
# training on a task a tiny model can learn: the answer is "yes" exactly when question 1 starts with "alpha"

WORDS = "red green blue cat dog fish tree house car road book lamp door city river stone cloud bird".split()


def write_learnable_quora(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "sentence1", "sentence2", "is_duplicate"])
        for i in range(n):
            label = i % 2
            s1 = ("alpha " if label else "omega ") + " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "?"
            s2 = " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "?"
            writer.writerow([f"q{i}", s1, s2, f"{label:.1f}"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny GPT-2 in the hub layout; block_size 256 so that a whole sonnet fits."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    save_pretrained(GPT(tiny_config(block_size=256)), directory)
    return directory


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("learnable")
    write_learnable_quora(directory / "quora-train.csv", 96, seed=1)
    write_learnable_quora(directory / "quora-dev.csv", 40, seed=2)
    return directory


def settings(tiny_dir, data_dir, out_dir, **overrides):
    return {**flags.defaults(trainer.SETTINGS), "task": "paraphrase", "init_from": str(tiny_dir), "data_dir": str(data_dir), "out_dir": str(out_dir),
            "device": "cpu", "epochs": 3, "lr": 3e-3, "warmup": 0.0, "dropout": 0.0, **overrides}


def weights(directory):
    return read_safetensors(directory / "model.safetensors")[0]


def test_sft_learns_the_task_and_writes_its_results(tiny_dir, learnable_data, tmp_path, capsys):
    before = train_sft.evaluate(load_model(tiny_dir), "paraphrase",
                                load_task_data(settings(tiny_dir, learnable_data, tmp_path))[1],
                                {"eval_batch_size": 64}, "cpu")
    # 5 epochs: at 3 the task is learnt or not depending on the data order (2 of 5 seeds' orders)
    results = train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "sft", epochs=5))
    assert before["accuracy"] <= 0.6 < 0.9 <= results["metrics"]["accuracy"]
    assert "paraphrase sft fft: accuracy" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert on_disk["score"] == results["score"] == results["metrics"]["accuracy"]
    for key in ("train_seconds", "eval_seconds", "tokens_per_second", "peak_memory_bytes", "total_parameters",
                "trainable_parameters"):
        assert results[key] > 0, key
    assert results["total_parameters"] == results["trainable_parameters"]
    assert results["config"]["lr"] == 3e-3 and results["device"] == "cpu" and len(results["history"]) == 5
    # best/ and last/ are GPT-2 checkpoints that eval.py's loader (and Hugging Face) can read
    best = load_model(tmp_path / "sft" / "best")
    assert train_sft.evaluate(best, "paraphrase", load_task_data(settings(tiny_dir, learnable_data, tmp_path))[1],
                              {"eval_batch_size": 64}, "cpu")["accuracy"] == results["best_score"]
    assert (tmp_path / "sft" / "last" / "config.json").exists()


def test_a_run_folder_means_its_last_weights_and_dpo_starts_from_them(tiny_dir, learnable_data, tmp_path):
    """best/ is chosen on dev: SFT->DPO (and eval.py, and load_model) start from <run>/last unless told <run>/best."""
    run = tmp_path / "sft"
    torch.manual_seed(1)
    save_pretrained(GPT(tiny_config(block_size=256)), run / "last")
    save_pretrained(from_pretrained(tiny_dir), run / "best")
    (run / "results.json").write_text("{}")
    assert torch.equal(load_model(run).lm_head.weight, from_pretrained(run / "last").lm_head.weight)
    results = train_dpo.train(settings(run, learnable_data, tmp_path / "dpo", epochs=1, train_limit=8))
    assert results["regime"] == "sft_dpo"
    pairs = preferences.paraphrase_pairs(read_quora(learnable_data / "quora-train.csv", limit=8))
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "device": "cpu"}
    last = train_dpo.scored_logps(from_pretrained(run / "last"), pairs, config, nullcontext())
    cached, = (tmp_path / "dpo").glob("reference-train-*.safetensors")
    assert torch.allclose(read_safetensors(cached)[0]["chosen"], last[0], atol=1e-5)


def test_lora_sft_trains_only_a_and_b_and_saves_only_the_adapter(tiny_dir, learnable_data, tmp_path):
    results = train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "lora", lora_r=4, epochs=1))
    assert results["method"] == "lora" and results["trainable_parameters"] == 2 * (4 * 64 + 192 * 4 + 4 * 64 + 64 * 4
                                                                                  + 4 * 64 + 256 * 4 + 4 * 256 + 64 * 4)
    assert sorted(p.name for p in (tmp_path / "lora" / "best").iterdir()) == ["adapter.safetensors",
                                                                              "adapter_config.json"]
    base, tuned = from_pretrained(tiny_dir), load_model(tmp_path / "lora")  # base + the adapter, merged
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    # only the adapted Linears' weights differ (by B A); embeddings, LayerNorms and biases are untouched
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed)


def test_dpo_raises_the_reward_margin_and_accuracy(tiny_dir, learnable_data, tmp_path):
    # 5 epochs: at 3 the margin passes 0.5 or not depending on the data order
    results = train_dpo.train(settings(tiny_dir, learnable_data, tmp_path / "dpo", epochs=5, beta=0.5))
    last = results["history"][-1]
    assert results["regime"] == "dpo"
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] >= 0.9
    assert last["yes_no_accuracy"] >= 0.9  # preferring the right answer token of the two is the task
    # DPO moves only the yes-no margin: the course's argmax over the vocabulary need not land on either
    assert last["accuracy"] <= last["yes_no_accuracy"]


def test_the_reference_never_changes_and_live_equals_precomputed(tiny_dir, learnable_data, tmp_path, monkeypatch):
    seen = []
    original = train_dpo.dpo_loss

    def spy(pc, pr, rc, rr, **options):
        assert not rc.requires_grad and not rr.requires_grad  # no gradient ever reaches the reference
        seen.append(original(pc, pr, rc, rr, **options)[0].detach().clone())
        return original(pc, pr, rc, rr, **options)

    monkeypatch.setattr(train_dpo, "dpo_loss", spy)
    losses = {}
    for method, lora_r in (("fft", 0), ("lora", 4)):
        for live in (False, True):
            seen.clear()
            out = tmp_path / f"{method}-{live}"
            train_dpo.train(settings(tiny_dir, learnable_data, out, epochs=1, lora_r=lora_r, live_reference=live,
                                     train_limit=32))
            losses[method, live] = torch.cat(seen)
    # a live reference that drifted during training would give other losses than the one computed before it
    for method in ("fft", "lora"):
        assert torch.allclose(losses[method, False], losses[method, True], atol=1e-5)
    # and the precomputed one is the starting model's: recompute it from the checkpoint on disk
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "device": "cpu"}
    pairs = preferences.paraphrase_pairs(read_quora(learnable_data / "quora-train.csv", limit=32))
    expected = train_dpo.scored_logps(from_pretrained(tiny_dir), pairs, config, nullcontext())
    for method in ("fft", "lora"):
        cached, = (tmp_path / f"{method}-False").glob("reference-train-*.safetensors")
        tensors = read_safetensors(cached)[0]
        assert torch.allclose(tensors["chosen"], expected[0], atol=1e-5)
        assert torch.allclose(tensors["rejected"], expected[1], atol=1e-5)


def test_sft_then_dpo_with_lora_uses_the_sft_model_as_reference(tiny_dir, learnable_data, tmp_path):
    """The classic DPO bug: after LoRA SFT, 'adapters off' is base GPT-2, not the SFT model."""
    train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "sft", lora_r=4, epochs=2))
    config = train_dpo.check_config({**flags.defaults(train_dpo.SETTINGS), "beta": 0.1,
                                     **settings(tmp_path / "sft", learnable_data, tmp_path / "dpo", lora_r=4)})
    policy = trainer.load_policy(config)
    pairs = preferences.paraphrase_pairs(load_task_data(config)[0])[:16]
    with train_dpo.adapters_off(policy):
        ref = train_dpo.scored_logps(policy, pairs, config, nullcontext())
    sft_model = load_model(tmp_path / "sft")
    base = from_pretrained(tiny_dir)
    assert torch.allclose(ref[0], train_dpo.scored_logps(sft_model, pairs, config, nullcontext())[0],
                          atol=1e-5)
    train_dpo.check_reference(policy, pairs, *ref, config, nullcontext())  # passes: same model
    wrong = train_dpo.scored_logps(base, pairs, config, nullcontext())
    with pytest.raises(InputError, match="the reference is not the model training starts from"):
        train_dpo.check_reference(policy, pairs, *wrong, config, nullcontext())
    results = train_dpo.train(settings(tmp_path / "sft", learnable_data, tmp_path / "dpo", lora_r=4, epochs=1))
    assert results["regime"] == "sft_dpo"


def test_gradient_accumulation_gives_the_same_update(tiny_dir, learnable_data, tmp_path):
    one = settings(tiny_dir, learnable_data, tmp_path / "one", epochs=1, train_limit=32, batch_size=8, dropout=0.0)
    train_sft.train(one)
    train_sft.train({**one, "out_dir": str(tmp_path / "two"), "grad_accum": 2})
    a, b = weights(tmp_path / "one" / "last"), weights(tmp_path / "two" / "last")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    moved = weights(tiny_dir)
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 1e-3  # the runs did train


def test_bf16_autocast_runs_on_cpu(tiny_dir, learnable_data, tmp_path):
    results = train_dpo.train(settings(tiny_dir, learnable_data, tmp_path / "bf16", epochs=1, train_limit=16,
                                       dtype="bfloat16"))
    assert math.isfinite(results["history"][0]["preference_loss"])


def test_sonnet_sft_and_dpo_end_to_end(tiny_dir, sample_data, tmp_path):
    common = dict(task="sonnet", epochs=1, train_limit=8, max_new_tokens=8, lr=1e-3)
    sft = train_sft.train(settings(tiny_dir, sample_data, tmp_path / "sft", **common))
    assert sft["score_name"] == "chrf" and 0 < sft["score"] < 100
    dpo = train_dpo.train(settings(tmp_path / "sft", sample_data, tmp_path / "dpo", lora_r=4, **common))
    assert dpo["regime"] == "sft_dpo" and math.isfinite(dpo["history"][0]["reward_margin"])
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "dpo").glob("*-*.*"))
    assert cached == ["reference", "reference", "rejections", "rejections"]  # train and dev, each cached once
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "dpo").glob("*-*.*")}
    train_dpo.train(settings(tmp_path / "sft", sample_data, tmp_path / "dpo2", lora_r=4,
                             cache_dir=str(tmp_path / "dpo"), **common))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "dpo").glob("*-*.*")} == before  # read back, not redone
    assert not list((tmp_path / "dpo2").glob("reference-*"))


# -----------------------------------------------------------------------------
# resuming


def run_script(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **kwargs}
    return subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *args], cwd=ROOT, env=env, text=True, **output)


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_dir, learnable_data, tmp_path, capsys):
    train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "r", epochs=1, train_limit=8, resume=True))
    assert "no " in capsys.readouterr().out and (tmp_path / "r" / "results.json").exists()
    with pytest.raises(InputError, match=r"results.json: written by a run with other settings \(--lr 0.003 then, "
                                         r"0.001 now\)"):
        train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "r", epochs=1, train_limit=8, resume=True,
                                 lr=1e-3))


# -----------------------------------------------------------------------------
# bad settings: one line, before anything is loaded


@pytest.mark.parametrize("flags, message", [
    (["--task", "poetry"], "--task poetry: must be paraphrase or sonnet"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch_size", "-1"], "--batch_size -1: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--lora_r", "-2"], "--lora_r -2: must be 0"),
    (["--lora_r", "4", "--lora_alpha", "0"], "--lora_alpha 0.0: must be a positive number"),
    (["--grad_accum", "9"], "--grad_accum 9: cannot split a batch of 8"),
    (["--train_limit", "0"], "--train_limit 0: must be at least 1"),
    (["--device", "tpu"], "--device 'tpu': not a device name"),
    (["--init_from", "gpt5"], "--init_from 'gpt5': neither a GPT-2 name"),
    (["--dtype", "fp8"], "--dtype fp8: must be auto, float32 or bfloat16"),
    (["--lora_r", "4", "--lora_targets", "attn.nope"], "--lora_targets attn.nope: LoRA target 'attn.nope' matches no module"),
])
def test_bad_settings_are_one_line_errors(flags, message, tiny_dir, learnable_data, tmp_path, capsys):
    base = {"--task": "paraphrase", "--init_from": str(tiny_dir), "--data_dir": str(learnable_data),
            "--out_dir": str(tmp_path / "out"), "--device": "cpu"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    for script in (train_sft, train_dpo):
        with pytest.raises(SystemExit) as exit_info:
            script.main([item for pair in base.items() for item in pair])
        assert str(exit_info.value).startswith("error: " + message), str(exit_info.value)
        assert "\n" not in str(exit_info.value)
        assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "checkpoint.pt").exists()


def test_bad_beta_missing_data_and_unwritable_out_dir(tiny_dir, learnable_data, tmp_path):
    common = ["--task", "paraphrase", "--init_from", str(tiny_dir), "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"error: --beta -0.1: must be a positive number"):
        train_dpo.main(common + ["--data_dir", str(learnable_data), "--out_dir", str(tmp_path / "o"), "--beta", "-0.1"])
    with pytest.raises(SystemExit, match=r"error: .*quora-train.csv: no such file"):
        train_sft.main(common + ["--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "o")])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"error: --out_dir .*a-file"):
        train_sft.main(common + ["--data_dir", str(learnable_data), "--out_dir", str(blocker)])


def test_an_example_longer_than_the_model_is_refused_before_training(learnable_data, tmp_path):
    save_pretrained(GPT(tiny_config(block_size=16)), tmp_path / "short")
    with pytest.raises(InputError, match="tokens long, more than the model's block_size of 16"):
        train_sft.train(settings(tmp_path / "short", learnable_data, tmp_path / "o"))


def test_a_nan_loss_stops_the_run_and_names_the_step(tiny_dir, learnable_data, tmp_path):
    with pytest.raises(InputError, match=r"the loss is (nan|inf) at step [1-9][0-9]* \(epoch [12]\); stopped"):
        train_sft.train(settings(tiny_dir, learnable_data, tmp_path / "nan", lr=1e30, epochs=2, grad_clip=0.0,
                                 warmup=0.0, checkpoint_every=1))


def test_seeds_and_epochs_never_share_a_data_order():
    lengths = list(range(1, 65))
    orders = {(seed, epoch): trainer.epoch_batches(lengths, {"batch_size": 8, "seed": seed}, epoch)
              for seed in (11711, 11712, 11713) for epoch in range(3)}
    # with seed + epoch, seed 11711's epoch 1 was seed 11712's epoch 0: every pair must differ now
    assert len({str(order) for order in orders.values()}) == len(orders)
    assert orders[11711, 0] == trainer.epoch_batches(lengths, {"batch_size": 8, "seed": 11711}, 0)  # and repeat


@pytest.mark.parametrize("script", [train_sft, train_dpo])
def test_lengths_that_do_not_fit_the_model_are_refused_before_it_loads(script, sample_data, tmp_path, monkeypatch):
    save_pretrained(GPT(tiny_config(block_size=120)), tmp_path / "short")  # shorter than the sample sonnets (163)
    save_pretrained(GPT(tiny_config(block_size=256)), tmp_path / "long")
    monkeypatch.setattr(trainer, "load_model", None)  # any load would fail loudly: the checks read config.json only
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"is 1[0-9]{2} tokens long, more than the model's block_size of 120"):
        script.train(settings(tmp_path / "short", sample_data, out, task="sonnet"))
    with pytest.raises(InputError, match=r"sonnets_held_out_dev.txt: sonnet 1[1-4]'s prompt is \d+ tokens; with "
                                         r"--max_new_tokens 250 that makes \d+, more than the model's 256 positions"):
        script.train(settings(tmp_path / "long", sample_data, out, task="sonnet", max_new_tokens=250))
    assert not out.exists()  # nothing left behind


def test_sonnet_rejections_are_the_sampled_tokens_with_end_of_text_only_when_sampled(sample_data, tmp_path):
    from data.batching import left_pad
    from data.sonnets import read_sonnets
    from data.tokenizer import END_OF_TEXT
    from eval import sample_continuations

    class Scripted(torch.nn.Module):  # "samples" fixed rows: one stops with end-of-text, one runs out of budget
        def generate(self, input_ids, max_new_tokens, **_):
            new = torch.tensor([[7, 8, END_OF_TEXT, END_OF_TEXT], [7, 8, 9, 10]])
            return torch.cat([input_ids, new], dim=1)

    assert sample_continuations(Scripted(), [[1, 2], [3]], max_new_tokens=4) == [[7, 8, END_OF_TEXT], [7, 8, 9, 10]]

    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256)).eval()
    sonnets = read_sonnets(sample_data / "sonnets.txt")[:2]
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "device": "cpu"}
    rejected = preferences.sample_rejections(model, sonnets, config, tmp_path, "weights", model.config.block_size)
    chosen = continuation_examples(sonnets)
    budget = max(len(c.target) for c in chosen)  # the longest true rest, with its end-of-text, fits
    ids, mask = left_pad([c.prompt for c in chosen])
    out = model.generate(ids, budget, temperature=config["temperature"], top_p=config["top_p"], attention_mask=mask,
                         generator=torch.Generator().manual_seed(config["seed"]))
    for tokens, row in zip(rejected, out[:, ids.size(1):].tolist()):  # what generate wrote, token for token
        assert tokens == (row[:row.index(END_OF_TEXT) + 1] if END_OF_TEXT in row else row)
    pairs = preferences.sonnet_pairs(sonnets, rejected)
    assert [p.rejected.target for p in pairs] == rejected and all(p.chosen.target[-1] == END_OF_TEXT for p in pairs)
    stats = preferences.rejection_stats(pairs)
    assert stats["rejected_tokens"] == sum(map(len, rejected)) / 2 and 0 <= stats["chrf"] <= 100
    cache, = tmp_path.glob("rejections-*.json")  # a truncated cache is sampled again, to the same tokens
    cache.write_text(cache.read_text()[:-9])
    assert preferences.sample_rejections(model, sonnets, config, tmp_path, "weights", 256) == rejected
    assert json.loads(cache.read_text())["rejected"] == rejected


def test_rejections_from_another_model_are_that_models_samples(sample_data, tmp_path, capsys):
    from data.sonnets import read_sonnets
    torch.manual_seed(1)
    other = GPT(tiny_config(block_size=256)).eval()
    save_pretrained(other, tmp_path / "other")
    torch.manual_seed(0)
    policy = GPT(tiny_config(block_size=256)).eval()
    sonnets = read_sonnets(sample_data / "sonnets.txt")[:2]
    dev = (read_sonnets(sample_data / "sonnets_held_out_dev.txt")[:1], read_sonnets(sample_data / "TRUE_sonnets_held_out_dev.txt"))
    config = {**flags.defaults(train_dpo.SETTINGS), "beta": 0.1, "task": "sonnet", "device": "cpu", "cache_dir": str(tmp_path),
              "rejections_from": str(tmp_path / "other")}
    pairs, dev_pairs = preferences.preference_pairs(policy, sonnets, dev, config)
    expected = preferences.sample_rejections(other, sonnets, config, tmp_path / "fresh", "other", 256)
    assert [p.rejected.target for p in pairs] == expected and len(dev_pairs) == 1
    with pytest.raises(SystemExit, match=r"error: --rejections_from '.*nowhere': neither a GPT-2 name"):
        train_dpo.main(["--task", "sonnet", "--device", "cpu", "--data_dir", str(sample_data), "--out_dir",
                        str(tmp_path / "o"), "--rejections_from", str(tmp_path / "nowhere")])
