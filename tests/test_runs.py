"""What a run shows and what it survives: log.jsonl (its losses against a recomputation, the learning rates against
the schedule's formula, every step once after kill -9 and --resume), --eval_every, --warmup's rounding, LoRA's
saved starting point, Weights & Biases; SIGTERM, two writers on one folder, a full disk, a damaged cache."""

import errno
import json
import math
import signal
import sys
import time
import types

import pytest
import torch

import checkpoint
import fileio
import train_dpo
import train_sft
import trainer
from data.batching import collate
from runlog import read_log
from test_train import run_script, settings, tiny_dir, weights, write_learnable_quora  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 training pairs (5 steps an epoch at the course's batch of 8), 8 dev pairs."""
    directory = tmp_path_factory.mktemp("runs_data")
    write_learnable_quora(directory / "quora-train.csv", 40, seed=7)
    write_learnable_quora(directory / "quora-dev.csv", 8, seed=8)
    return directory


def command(tiny_dir, data, out, *more):
    return ["--task", "paraphrase", "--init_from", str(tiny_dir), "--data_dir", str(data), "--out_dir", str(out),
            "--device", "cpu", "--lr", "1e-3", *more]


def train_lines(out):
    return [line for line in read_log(out / "log.jsonl") if "loss" in line]


# -----------------------------------------------------------------------------
# log.jsonl


def test_log_lines_hold_the_mean_loss_that_the_same_weights_and_batches_give(tiny_dir, data, tmp_path, monkeypatch):
    """With the learning rate held at 0 the weights never move, so every step's loss can be recomputed from the
    starting model and the epoch's batches: the logged means (each line: the mean since the line before) equal it."""
    monkeypatch.setattr(trainer, "lr_at", lambda *args: 0.0)
    config = settings(tiny_dir, data, tmp_path / "run", epochs=2, log_every=2)
    results = train_sft.train(config)
    lines = train_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [2, 4, 5, 6, 8, 10]  # every 2nd step, and at each epoch's end
    for line in lines:
        assert set(line) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_second", "elapsed"}
        assert line["lr"] == 0.0 and line["grad_norm"] > 0 and line["tokens_per_second"] > 0
    model = checkpoint.load_model(tiny_dir)
    examples = [train_sft.paraphrase_example(r) for r in train_sft.load_task_data(config)[0]]
    config = trainer.check_config(config)
    for epoch in range(2):
        batches = trainer.epoch_batches([len(e) for e in examples], config, epoch)
        with torch.no_grad():
            recomputed = [train_sft.sft_loss(model, collate([examples[i] for i in b]))[0].item() for b in batches]
        logged = [line for line in lines if epoch < line["epoch"] <= epoch + 1]
        steps = [line["step"] - previous["step"] for previous, line in zip([{"step": 5 * epoch}] + logged, logged)]
        mean = sum(line["loss"] * n for line, n in zip(logged, steps)) / sum(steps)
        assert mean == pytest.approx(sum(recomputed) / len(recomputed), abs=1e-6)
        assert results["history"][epoch]["train_loss"] == pytest.approx(mean, abs=1e-6)  # the epoch's mean now
    evaluations = [line for line in read_log(tmp_path / "run" / "log.jsonl") if "dev" in line]
    assert [e["step"] for e in evaluations] == [5, 10] and evaluations[-1]["dev"]["accuracy"] == results["score"]


def test_a_run_with_its_output_in_a_file_prints_each_log_line(tiny_dir, data, tmp_path):
    with open(tmp_path / "nohup.out", "w") as out:  # as under nohup: stdout and stderr are a file
        process = run_script(command(tiny_dir, data, tmp_path / "run", "--epochs", "1", "--log_every", "2"),
                             stdout=out, stderr=out)
        assert process.wait(timeout=300) == 0
    printed = [json.loads(text) for text in (tmp_path / "nohup.out").read_text().splitlines() if text.startswith("{")]
    assert [line["step"] for line in printed if "loss" in line] == [2, 4, 5]
    assert printed == read_log(tmp_path / "run" / "log.jsonl")


@pytest.mark.parametrize("total_steps", [5, 10, 40])
def test_warmup_never_rounds_to_zero_and_the_logged_rates_follow_the_formula(total_steps):
    lrs = [trainer.lr_at(s, total_steps, 1e-3, warmup=0.05, min_lr_ratio=0.1) for s in range(total_steps)]
    warmup = math.ceil(0.05 * total_steps)
    assert warmup >= 1 and lrs[0] == pytest.approx(1e-3 / warmup)
    for s in range(warmup, total_steps):
        cosine = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total_steps - warmup)))
        assert lrs[s] == pytest.approx(1e-3 * (0.1 + 0.9 * cosine))


def test_a_10_step_run_warms_up_and_logs_the_schedules_rates(tiny_dir, data, tmp_path):
    results = train_sft.train(settings(tiny_dir, data, tmp_path / "run", epochs=2, log_every=1, warmup=0.05,
                                       lr=1e-3, eval_every=-1))
    lines = train_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == list(range(1, 11)) and results["steps"] == 10
    assert [line["lr"] for line in lines] == pytest.approx([trainer.lr_at(s, 10, 1e-3, 0.05, 0.1) for s in range(10)])
    assert lines[0]["lr"] == pytest.approx(1e-3)  # one warm-up step: (0 + 1) / 1 of the peak
    assert len(results["history"]) == 1  # --eval_every -1: scored once, at the end


def test_eval_every_scores_every_n_steps_and_at_the_end(tiny_dir, data, tmp_path):
    results = train_sft.train(settings(tiny_dir, data, tmp_path / "run", epochs=2, eval_every=3))
    assert [h["step"] for h in results["history"]] == [3, 6, 9, 10]
    assert [h["epoch"] for h in results["history"]] == [0.6, 1.2, 1.8, 2]


def test_wandb_gets_every_line_and_a_missing_package_is_one_line(tiny_dir, data, tmp_path, monkeypatch):
    calls = []
    recorder = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or recorder,
                                     log=lambda values, step: calls.append(("log", step, values)))
    monkeypatch.setitem(sys.modules, "wandb", recorder)
    train_sft.train(settings(tiny_dir, data, tmp_path / "run", epochs=1, log_every=1, wandb_project="p"))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p"
    assert [c[1] for c in calls[1:]] == [line["step"] for line in read_log(tmp_path / "run" / "log.jsonl")]
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    with pytest.raises(fileio.InputError, match="--wandb_project p: the wandb package is not installed"):
        train_sft.train(settings(tiny_dir, data, tmp_path / "run2", epochs=1, wandb_project="p"))


# -----------------------------------------------------------------------------
# exact repeats: LoRA's starting point, kill -9, SIGTERM


def test_a_lora_run_repeats_bit_exactly_from_its_saved_starting_point(tiny_dir, data, tmp_path):
    """Two processes; the second is told nothing but what the first wrote (its flags in results.json and
    lora_init.safetensors), and with another --seed its own random A would differ."""
    first = run_script(command(tiny_dir, data, tmp_path / "a", "--epochs", "1", "--lora_r", "4"))
    assert first.wait(timeout=300) == 0, first.stdout.read()
    saved = json.loads((tmp_path / "a" / "results.json").read_text())["config"]
    assert (tmp_path / "a" / "lora_init.safetensors").exists()
    again = [f"--{k}={v}" for k, v in saved.items() if v is not None and k not in ("out_dir", "lora_init")]
    second = run_script(again + ["--out_dir", str(tmp_path / "b"), "--lora_init",
                                 str(tmp_path / "a" / "lora_init.safetensors")])
    assert second.wait(timeout=300) == 0, second.stdout.read()
    a, b = weights_of(tmp_path / "a" / "last"), weights_of(tmp_path / "b" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = fileio.read_safetensors(tmp_path / "a" / "lora_init.safetensors")[0]
    assert not any(torch.equal(init[k], a[k]) for k in init if k.endswith("lora_A"))  # A trained from there


def weights_of(folder):
    return fileio.read_safetensors(folder / "adapter.safetensors")[0]


def interrupted(args, out, sig, when):
    """Start a run, wait until `when(out)`, send `sig`; returns the finished process."""
    process = run_script(args + ["--out_dir", str(out)])
    deadline = time.time() + 120
    while not when(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_dir):
    """(the flags of a 24-step run that logs every step and saves every 5, the folder of that run never stopped)."""
    data = tmp_path_factory.mktemp("resume_data")
    write_learnable_quora(data / "quora-train.csv", 96, seed=3)
    write_learnable_quora(data / "quora-dev.csv", 8, seed=4)
    args = ["--task", "paraphrase", "--init_from", str(tiny_dir), "--data_dir", str(data), "--device", "cpu",
            "--lr", "1e-3", "--epochs", "2", "--dropout", "0.1", "--log_every", "1", "--checkpoint_every", "5"]
    out = tmp_path_factory.mktemp("straight")
    straight = run_script(args + ["--out_dir", str(out)])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    return args, out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_interrupted_run_resumes_to_the_weights_and_log_of_an_unbroken_one(sig, unbroken, tmp_path):
    """kill -9 after a --checkpoint_every save, or SIGTERM at any step (the run saves, says how to go on and
    exits 143 within that step); --resume then ends bit-identical to a run never stopped, and log.jsonl holds
    every step exactly once."""
    args, straight = unbroken
    if sig == signal.SIGKILL:
        when = lambda out: (out / "checkpoint.pt").exists()  # noqa: E731
    else:
        when = lambda out: len(train_lines(out)) >= 3  # noqa: E731
    stopped = interrupted(args, tmp_path / "stopped", sig, when)
    output = stopped.stdout.read()
    assert not (tmp_path / "stopped" / "results.json").exists()
    step = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["step"]
    if sig == signal.SIGTERM:
        assert stopped.returncode == 128 + signal.SIGTERM, output
        assert "stopped by SIGTERM at step" in output and "--resume" in output and "Traceback" not in output
        assert step < 12 and step == train_lines(tmp_path / "stopped")[-1]["step"]  # within one step, mid-epoch
    else:
        assert stopped.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    resumed = run_script(args + ["--out_dir", str(tmp_path / "stopped"), "--resume"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resuming from" in output, output
    a, b = weights(straight / "last"), weights(tmp_path / "stopped" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [line["step"] for line in train_lines(tmp_path / "stopped")] == list(range(1, 25))


# -----------------------------------------------------------------------------
# one writer per folder


def test_a_second_writer_stops_at_once_and_the_first_run_is_as_if_alone(tiny_dir, data, tmp_path):
    args = command(tiny_dir, data, tmp_path / "shared", "--epochs", "3")
    first = run_script(args)
    lock, deadline = tmp_path / "shared" / ".lock", time.time() + 60
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.time() < deadline:
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)  # held while the second starts, however fast the machine
    t0 = time.time()
    second = run_script(args[:-2] + ["--lr", "3e-4"])
    output = second.communicate(timeout=60)[0]
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and time.time() - t0 < 30
    assert output.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'shared'}: in use by process {first.pid}")
    assert first.wait(timeout=300) == 0
    alone = run_script(command(tiny_dir, data, tmp_path / "alone", "--epochs", "3"))
    assert alone.wait(timeout=300) == 0
    a, b = weights(tmp_path / "shared" / "last"), weights(tmp_path / "alone" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "shared" / "results.json").read_text())["config"]["lr"] == 1e-3


def test_a_killed_writer_leaves_no_lock(tiny_dir, data, tmp_path):
    args = ["--task", "paraphrase", "--init_from", str(tiny_dir), "--data_dir", str(data), "--device", "cpu"]
    killed = interrupted(args + ["--epochs", "3"], tmp_path / "run", signal.SIGKILL,
                         lambda out: (out / ".lock").exists() and (out / ".lock").read_text().strip())
    assert killed.returncode == -signal.SIGKILL
    again = run_script(args + ["--epochs", "1", "--out_dir", str(tmp_path / "run")])
    assert again.wait(timeout=300) == 0, again.stdout.read()


# -----------------------------------------------------------------------------
# a full disk, a damaged cache


def test_a_full_disk_is_one_line_and_the_last_checkpoint_still_loads(tiny_dir, data, tmp_path, monkeypatch):
    config = settings(tiny_dir, data, tmp_path / "run", epochs=2, checkpoint_every=2, keep_checkpoints=True)
    saves, real_save = [], torch.save

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(fileio.InputError) as error:
        train_sft.train(config)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "run") in message and "free" in message
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    results = train_sft.train({**config, "resume": True})  # once there is room again, --resume goes on
    assert results["steps"] == 10


def test_a_damaged_reference_cache_is_computed_again(tiny_dir, data, tmp_path, capsys):
    config = settings(tiny_dir, data, tmp_path / "clean", epochs=1, train_limit=16)
    clean = train_dpo.train(config)
    cache, = (tmp_path / "clean").glob("reference-train-*.safetensors")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / cache.name).write_bytes(cache.read_bytes()[:-7])  # truncated
    capsys.readouterr()
    damaged = train_dpo.train({**config, "out_dir": str(tmp_path / "damaged")})
    assert f"warning: {tmp_path / 'damaged' / cache.name}" in capsys.readouterr().err
    assert damaged["score"] == clean["score"] and damaged["history"][-1]["train_loss"] == clean["history"][-1]["train_loss"]
    assert (tmp_path / "damaged" / cache.name).read_bytes() == cache.read_bytes()
