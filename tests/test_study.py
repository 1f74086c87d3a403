"""study.py end to end with --smoke (a tiny random GPT-2 on the repository's data/samples): all 12 conditions
with measured figures, the final-epoch scores and their statistics recomputed from the runs' files with
independent oracles (scipy, sacrebleu, stats.bootstrap_ci), a second run that trains nothing, subsets, several
seeds, --jobs (same numbers as in one process, every process stopped with the study), a study split over
"machines" that gives the same table, and bad flags."""

import contextlib
import csv
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import flags
import jobs
import stats
import study
import train_dpo
import train_sft
import trainer
from data.sonnets import read_sonnets

ALL = [(t, r, m) for t in study.TASKS for r in study.REGIMES for m in study.METHODS]
SMOKE_DEV_PAIRS = 30  # data/samples/quora-dev.csv


def forbid_training(monkeypatch):
    def refuse(*args):
        raise AssertionError(f"trained {args[-1]['out_dir'] if isinstance(args[-1], dict) else args} again")
    monkeypatch.setattr(train_sft, "train", refuse)
    monkeypatch.setattr(train_dpo, "train", refuse)
    monkeypatch.setattr(jobs, "launch", lambda trainer, config, env: refuse(config))


def forbid_sampling(monkeypatch):
    def refuse(plan, weights, settings, seeds):
        raise AssertionError(f"sampled {weights} again")
    monkeypatch.setattr(study, "sample", refuse)


def run_study(*flags):
    """study.main with --smoke on the CPU; returns (rows, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = study.main(["--smoke", "--device", "cpu", *map(str, flags)])
    return rows, printed.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke study, run once for the module: (out_dir, study.json, study.md, what it printed)."""
    out_dir = tmp_path_factory.mktemp("study") / "smoke"
    _, printed = run_study("--out_dir", out_dir)
    return out_dir, json.loads((out_dir / "study.json").read_text()), (out_dir / "study.md").read_text(), printed


def results_of(out_dir, task, regime, method, seed=11711):
    return json.loads((out_dir / f"{task}-{regime}-{method}-seed{seed}" / "results.json").read_text())


def correct_of(out_dir, regime, method, seed=11711):
    saved = json.loads((out_dir / f"paraphrase-{regime}-{method}-seed{seed}" / "dev_predictions.json").read_text())
    assert len(saved["correct"]) == SMOKE_DEV_PAIRS and set(saved["correct"]) <= {0, 1}
    return saved["correct"]


def quora_dev_labels(path):
    """The dev labels, read with the csv module (not the project's reader)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [int(float(row[3])) for row in list(csv.reader(f, delimiter="\t"))[1:]]


# -----------------------------------------------------------------------------
# the smoke study


def test_smoke_study_has_all_12_rows_with_measured_figures(smoke):
    out_dir, summary, markdown, printed = smoke
    rows = summary["rows"]
    assert [(r["task"], r["regime"], r["method"]) for r in rows] == ALL
    for row in rows:
        assert row["seeds"] == [study.FIRST_SEED]
        for key in ("train_seconds", "tokens_per_second", "peak_memory_bytes", "trainable_parameters"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["task"], row["regime"], row["method"], key)
        low, high = row["ci95"]
        top = 1 if row["task"] == "paraphrase" else 100
        assert 0 <= low <= row["score"] <= high <= top, row  # 30 pairs / 4 sonnets: the interval is wide
        total = row["total_parameters"]
        assert row["trainable_parameters"] == total if row["method"] == "fft" else 0 < row["trainable_parameters"] < total / 50
        run = results_of(out_dir, row["task"], row["regime"], row["method"])
        assert run["regime"] == row["regime"] and run["method"] == row["method"]
        # the final epoch's figures, and beside them the best epoch's, as the course reports it
        assert run["score"] == run["history"][-1]["score"] and row["run_scores"] == [run["score"]]
        assert run["best_score"] == max(h["score"] for h in run["history"]) == row["best_score"]
        assert row["best_epochs"] == [run["best_epoch"]] and row["epochs"] == len(run["history"])
        if row["task"] == "paraphrase":
            assert row["scores"] == [run["score"]]
    # SFT->DPO costs both stages: its train_seconds include the SFT run's
    for task in study.TASKS:
        for method in study.METHODS:
            sft = next(r for r in rows if (r["task"], r["regime"], r["method"]) == (task, "sft", method))
            staged = next(r for r in rows if (r["task"], r["regime"], r["method"]) == (task, "sft_dpo", method))
            assert staged["train_seconds"] > sft["train_seconds"]
    assert "SMOKE" in markdown and "| task" in markdown and summary["verdict"] in markdown
    assert markdown.count("\n| paraphrase ") == 6 and markdown.count("\n| sonnet ") == 6
    assert "best dev epoch (as the course reports it" in markdown and "score, final epoch" in markdown
    assert markdown.split("\n\n")[2] in printed  # the same table is printed


def test_the_smoke_study_reads_only_the_repository(smoke):
    """--smoke trains on data/samples/ (no ../shared, no download) and from a model it writes in out_dir."""
    out_dir, summary, _, _ = smoke
    for task, regime, method in ALL:
        config = results_of(out_dir, task, regime, method)["config"]
        assert Path(config["data_dir"]) == study.ROOT / "data" / "samples"
        assert Path(config["init_from"]).is_relative_to(out_dir)
    assert summary["model"] == str(out_dir / "tiny-gpt2")


def test_the_dev_set_the_smoke_preset_uses_is_all_of_the_samples(smoke):
    out_dir = smoke[0]
    labels = quora_dev_labels(study.ROOT / "data" / "samples" / "quora-dev.csv")
    assert len(labels) == SMOKE_DEV_PAIRS
    train = results_of(out_dir, "paraphrase", "sft", "fft")
    assert train["config"]["train_limit"] is None and train["config"]["dev_limit"] is None


def test_a_finished_study_is_small_on_disk(smoke):
    """One copy of weights per run (last/): no best/, no checkpoint.pt; the whole smoke study under 120 MB."""
    out_dir = smoke[0]
    for task, regime, method in ALL:
        run = out_dir / f"{task}-{regime}-{method}-seed11711"
        assert (run / "last").is_dir() and not (run / "best").exists() and not (run / "checkpoint.pt").exists()
        assert (run / "dev_predictions.json").is_file()
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    assert size < 120 * 2 ** 20, f"{size / 2 ** 20:.0f} MiB"


def test_plots_or_how_to_get_them(smoke):
    """The figures' data in study.json for every condition (dev curve: the runs' histories; training curve: the
    first seed's log.jsonl loss lines); with plot.py and matplotlib (an optional extra) the PNGs it draws, linked
    from study.md; without them, how to get them."""
    out_dir, summary, markdown, _ = smoke
    data = summary["figures_data"]
    assert [(d["task"], d["regime"], d["method"]) for d in data] == ALL
    for d, row in zip(data, summary["rows"]):
        assert d["score"] == row["score"] and d["ci"] == row["ci95"] and d["train_seconds"] == row["train_seconds"]
        stages = 2 if row["regime"] == "sft_dpo" else 1
        epochs = results_of(out_dir, row["task"], "sft", row["method"])["config"]["epochs"]
        assert len(d["dev_curve"]) == stages * epochs
        assert d["dev_curve"][-1][1] == results_of(out_dir, *row["runs"][0].split("/")[-1].split("-")[:3])["score"]
    try:
        import matplotlib  # noqa: F401
        import plot  # noqa: F401  (plot.py: another helper's, issue 21)
    except ImportError:
        assert not summary["plots"] and "pip install matplotlib" in markdown
        return
    assert summary["plots"]
    for name in summary["plots"]:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in markdown


def test_paraphrase_scores_and_paired_differences_follow_from_the_predictions(smoke):
    """Accuracy, its interval and the difference from SFT-only FFT, recomputed from each run's final-epoch
    per-pair correctness: McNemar's p (of the two trained models; one seed gives no p-value about methods) from
    scipy's exact binomial test on the discordant pairs, the intervals from stats.bootstrap_ci (the same draws)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    out_dir, summary, _, _ = smoke
    baseline = correct_of(out_dir, "sft", "fft")

    def mean(hypotheses, references):
        return sum(hypotheses) / len(hypotheses)

    for row in [r for r in summary["rows"] if r["task"] == "paraphrase"]:
        mine = correct_of(out_dir, row["regime"], row["method"])
        assert row["score"] == pytest.approx(sum(mine) / len(mine))
        assert row["ci95"] == pytest.approx(list(stats.bootstrap_ci(mean, mine, mine, n_resamples=1000)))
        if (row["regime"], row["method"]) == ("sft", "fft"):
            assert "vs_sft_fft" not in row
            continue
        only_mine = sum(a and not b for a, b in zip(mine, baseline))
        only_base = sum(b and not a for a, b in zip(mine, baseline))
        versus = row["vs_sft_fft"]
        assert versus["difference"] == pytest.approx((only_mine - only_base) / len(mine))
        expected = 1.0 if only_mine + only_base == 0 else scipy_stats.binomtest(only_mine, only_mine + only_base).pvalue
        assert versus["p_value"] is None and "two trained models" in versus["test"]
        assert versus["mcnemar"]["p_value"] == pytest.approx(expected) and "McNemar" in versus["mcnemar"]["test"]
        differences = [a - b for a, b in zip(mine, baseline)]
        assert versus["ci95"] == pytest.approx(list(stats.bootstrap_ci(mean, differences, differences)))


def test_sonnet_scores_are_sacrebleu_chrf_over_the_sampling_seeds(smoke):
    """Each sonnet run's final weights sampled with 3 seeds (cached in study_sonnets.json); the row's score is
    the mean of sacrebleu's corpus chrF over them. The first seed is the one training scored with, so for a
    full fine-tuning run its texts are the run's own dev_predictions.json."""
    sacrebleu = pytest.importorskip("sacrebleu")
    out_dir, summary, _, _ = smoke
    held_out = read_sonnets(study.ROOT / "data" / "samples" / "sonnets_held_out_dev.txt")
    truth = {s.number: s.text for s in read_sonnets(study.ROOT / "data" / "samples" / "TRUE_sonnets_held_out_dev.txt")}
    references = [truth[s.number] for s in held_out]
    for row in [r for r in summary["rows"] if r["task"] == "sonnet"]:
        run = out_dir / f"sonnet-{row['regime']}-{row['method']}-seed11711"
        cached = json.loads((run / "study_sonnets.json").read_text())["sonnets"]
        seeds = [11711, 12711, 13711]
        assert row["sample_seeds"] == [seeds] and sorted(cached) == [str(s) for s in seeds]
        scores = [sacrebleu.CHRF().corpus_score([t for _, t in cached[str(s)]], [references]).score for s in seeds]
        assert row["sampled_scores"] == [pytest.approx(scores)]
        assert row["score"] == pytest.approx(np.mean(scores)) and row["scores"] == [pytest.approx(np.mean(scores))]
        if row["method"] == "fft":
            trained = json.loads((run / "dev_predictions.json").read_text())["sonnets"]
            assert cached["11711"] == trained and scores[0] == pytest.approx(results_of(out_dir, "sonnet", row["regime"], "fft")["score"])
        if (row["regime"], row["method"]) != ("sft", "fft"):
            low, high = row["vs_sft_fft"]["ci95"]
            assert low <= row["vs_sft_fft"]["difference"] <= high and row["vs_sft_fft"]["p_value"] is None


def test_one_seed_tells_no_method_apart(smoke):
    """With one seed each condition is one trained model: the paper's 7 questions per task are listed with their
    differences (and McNemar's test of the two models for paraphrase), but none has a p-value or enters Holm's
    family, and the verdict says that comparing methods needs --seeds 2 or more."""
    out_dir, summary, markdown, _ = smoke
    contrasts = summary["contrasts"]
    assert [c["question"] for c in contrasts[:7]] == [
        "LoRA vs FFT, SFT-only", "LoRA vs FFT, DPO-only", "LoRA vs FFT, SFT→DPO", "SFT→DPO vs SFT-only, FFT",
        "SFT→DPO vs SFT-only, LoRA", "DPO-only vs SFT-only, FFT", "DPO-only vs SFT-only, LoRA"]
    assert len(contrasts) == 14 and [c["task"] for c in contrasts] == ["paraphrase"] * 7 + ["sonnet"] * 7
    assert all(c["p_value"] is None and "told_apart" not in c for c in contrasts)
    assert all(("mcnemar" in c) == (c["task"] == "paraphrase") for c in contrasts)
    assert "--seeds 2" in summary["verdict"] and "no method is told apart" in summary["verdict"]
    assert summary["verdict"] in markdown and "Holm" in markdown


def test_dpo_runs_share_one_cache(smoke):
    """DPO-only FFT and LoRA start from the same model, so they share reference log-probabilities and sampled
    rejections: 3 starting models per task (GPT-2, SFT FFT, SFT LoRA), each with a train and a dev file."""
    cache = smoke[0] / "cache"
    assert len(list(cache.glob("reference-train-*"))) == 6 and len(list(cache.glob("reference-dev-*"))) == 6
    assert len(list(cache.glob("rejections-*"))) == 6  # sonnets only


def test_a_second_run_trains_and_samples_nothing(smoke, monkeypatch):
    out_dir, summary, _, _ = smoke
    stamps = {p: p.stat().st_mtime_ns for p in [*out_dir.glob("*/results.json"), *out_dir.glob("*/study_sonnets.json")]}
    assert len(stamps) == 12 + 6
    forbid_training(monkeypatch)
    forbid_sampling(monkeypatch)
    rows, _ = run_study("--out_dir", out_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["score"] for r in rows] == [r["score"] for r in summary["rows"]]


def test_tasks_regimes_and_methods_select_conditions(smoke, monkeypatch):
    out_dir, _, _, _ = smoke
    forbid_training(monkeypatch)
    rows, _ = run_study("--out_dir", out_dir, "--tasks", "sonnet", "--regimes", "sft_dpo,dpo", "--methods", "lora")
    assert [(r["task"], r["regime"], r["method"]) for r in rows] == [("sonnet", "dpo", "lora"), ("sonnet", "sft_dpo", "lora")]
    written = json.loads((out_dir / "study.json").read_text())
    assert [(r["task"], r["regime"], r["method"]) for r in written["rows"]] == [("sonnet", "dpo", "lora"),
                                                                              ("sonnet", "sft_dpo", "lora")]
    assert "vs_sft_fft" not in written["rows"][0]  # the baseline was not selected: nothing to pair with
    assert "No paired differences" in written["verdict"]


def test_an_interrupted_study_trains_only_what_is_missing(smoke, monkeypatch):
    """A run without results.json (the study stopped during it) is trained again, resuming if it can; every
    other run is read back. SFT->DPO starts from its SFT run's final weights, last/."""
    out_dir, summary, _, _ = smoke
    (out_dir / "sonnet-sft_dpo-lora-seed11711" / "results.json").unlink()
    trained, real_train = [], train_dpo.train
    forbid_training(monkeypatch)
    monkeypatch.setattr(train_dpo, "train", lambda config: trained.append(config) or real_train(config))
    rows, _ = run_study("--out_dir", out_dir)
    assert [(Path(c["out_dir"]).name, c["resume"]) for c in trained] == [("sonnet-sft_dpo-lora-seed11711", True)]
    assert Path(trained[0]["init_from"]) == out_dir / "sonnet-sft-lora-seed11711" / "last"
    assert [r["score"] for r in rows] == [r["score"] for r in summary["rows"]]


def test_several_seeds_give_a_mean_a_spread_and_a_bootstrap_over_seeds(smoke):
    """--seeds 2: each row is the mean and sample standard deviation of its runs (numpy as the oracle), its interval
    the t interval across seeds, and the comparison with SFT-only FFT the paired t-test on the per-seed differences;
    the contrasts table and the verdict answer DPO-only vs SFT-only. Trains only the two seed-11712 runs."""
    out_dir = smoke[0]
    rows, _ = run_study("--out_dir", out_dir, "--seeds", "2", "--tasks", "paraphrase", "--regimes", "sft,dpo",
                        "--methods", "fft")
    for row in rows:
        runs = [results_of(out_dir, "paraphrase", row["regime"], "fft", s) for s in (11711, 11712)]
        assert row["seeds"] == [11711, 11712] and row["scores"] == pytest.approx([r["score"] for r in runs])
        assert row["score"] == pytest.approx(np.mean(row["scores"]))
        assert row["score_std"] == pytest.approx(np.std(row["scores"], ddof=1), abs=1e-12)
        assert row["train_seconds"] == pytest.approx(np.mean([r["train_seconds"] for r in runs]))
    versus = rows[1]["vs_sft_fft"]
    assert versus["test"] == "paired t-test over 2 seeds (1 degrees of freedom)" and "mcnemar" not in versus
    mine = [np.mean(correct_of(out_dir, "dpo", "fft", s)) - np.mean(correct_of(out_dir, "sft", "fft", s)) for s in (11711, 11712)]
    assert versus["difference"] == pytest.approx(np.mean(mine)) and versus["per_seed"] == pytest.approx(mine)
    summary = json.loads((out_dir / "study.json").read_text())
    [contrast] = summary["contrasts"]
    assert contrast["question"] == "DPO-only vs SFT-only, FFT" and contrast["per_seed"] == pytest.approx(mine)
    assert "Paraphrase, 2 seeds, paired t-tests" in summary["verdict"]
    assert ("told apart" if contrast["told_apart"] else "this design detects") in summary["verdict"]
    for row in rows:  # each condition's interval is across seeds: the t interval of its 2 per-seed scores
        assert row["ci95"] == pytest.approx(stats.t_test(row["scores"])["ci95"])
    markdown = (out_dir / "study.md").read_text()
    assert "DPO-only vs SFT-only, FFT: " in markdown and "two trained models" not in markdown


# -----------------------------------------------------------------------------
# the statistics on made-up data


def test_holm_matches_hand_values_and_the_step_down_procedure():
    """Hand values: p = (0.01, 0.04, 0.03, 0.005) sorted is 0.005, 0.01, 0.03, 0.04, times 4, 3, 2, 1 is 0.02,
    0.03, 0.06, 0.04, made non-decreasing: 0.02, 0.03, 0.06, 0.06. Then, on random p-values, "adjusted p <=
    alpha" must be exactly Holm's step-down rule: reject H_(1..k) while p_(i) <= alpha / (m - i + 1)."""
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert study.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and study.holm([]) == []
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, size=rng.integers(1, 12)))
        alpha = rng.uniform(0.01, 0.1)
        rejected, m = set(), len(p)
        for i, index in enumerate(sorted(range(m), key=lambda j: p[j])):
            if p[index] > alpha / (m - i):
                break
            rejected.add(index)
        assert {i for i, q in enumerate(study.holm(p)) if q <= alpha} == rejected


def test_one_seed_gives_an_interval_for_two_models_and_no_p_value():
    """A model right on all 40 pairs where the baseline is wrong on 12: the difference and McNemar's p (scipy);
    sonnets copied from the references against nonsense over two sampling seeds: a bootstrap interval above 0."""
    scipy_stats = pytest.importorskip("scipy.stats")
    mine, base = np.ones(40), np.array([0.0] * 12 + [1.0] * 28)
    para = study.versus_baseline("paraphrase", [[mine]], [[base]], None)
    assert para["difference"] == pytest.approx(12 / 40) and para["ci95"][0] > 0 and para["p_value"] is None
    assert para["mcnemar"]["p_value"] == pytest.approx(scipy_stats.binomtest(12, 12).pvalue)
    references = ["Shall I compare thee to a summer's day?", "When forty winters shall besiege thy brow",
                  "Look in thy glass and tell the face thou viewest", "Music to hear, why hear'st thou music sadly?"]
    sonnets = study.versus_baseline("sonnet", [[references, references]], [[["zzz qqq"] * 4, ["qqq"] * 4]], references)
    assert sonnets["difference"] > 50 and sonnets["ci95"][0] > 0 and sonnets["p_value"] is None


def made_up_runs(rng, shifts, n_pairs=400):
    """items[(task, regime, method)] for the 6 paraphrase conditions, one run per shift: per-pair correctness
    with accuracy 0.8 + that seed's shift."""
    return {("paraphrase", r, m): [[(rng.random(n_pairs) < 0.8 + shift).astype(np.float64)] for shift in shifts[(r, m)]]
            for r in study.REGIMES for m in study.METHODS}


def test_several_seeds_answer_the_papers_questions_with_a_paired_t_test_and_holm():
    """3 seeds: each question's per-seed differences, scipy's paired t-test on the per-seed accuracies, Holm over
    the task's 7 questions, and for each one not told apart the smallest difference with 80% power at Holm's
    first threshold (stats.smallest_detectable); the verdict says it in words."""
    scipy_stats = pytest.importorskip("scipy.stats")
    shifts = {(r, m): [0.0, 0.01, -0.01] for r in study.REGIMES for m in study.METHODS}
    shifts[("sft", "lora")] = [0.15, 0.16, 0.14]  # LoRA far better than FFT after SFT
    items = made_up_runs(np.random.default_rng(0), shifts)
    plan = {"tasks": ["paraphrase"], "regimes": list(study.REGIMES), "methods": list(study.METHODS),
            "seeds": [1, 2, 3], "dev": {"paraphrase": [0] * 400}}
    contrasts = study.contrasts(plan, items)
    pairs = [(("sft", "lora"), ("sft", "fft")), (("dpo", "lora"), ("dpo", "fft")),
             (("sft_dpo", "lora"), ("sft_dpo", "fft")), (("sft_dpo", "fft"), ("sft", "fft")),
             (("sft_dpo", "lora"), ("sft", "lora")),
             (("dpo", "fft"), ("sft", "fft")), (("dpo", "lora"), ("sft", "lora"))]
    assert len(contrasts) == 7 and all(c["comparisons"] == 7 for c in contrasts)
    for c, (a, b) in zip(contrasts, pairs):
        mine = [outcomes[0].mean() for outcomes in items[("paraphrase", *a)]]
        theirs = [outcomes[0].mean() for outcomes in items[("paraphrase", *b)]]
        assert c["per_seed"] == pytest.approx(np.subtract(mine, theirs))
        assert c["p_value"] == pytest.approx(scipy_stats.ttest_rel(mine, theirs).pvalue)
    assert [c["p_holm"] for c in contrasts] == pytest.approx(study.holm([c["p_value"] for c in contrasts]))
    first = contrasts[0]
    assert first["question"] == "LoRA vs FFT, SFT-only" and first["told_apart"] and first["difference"] > 0.1
    quiet = [c for c in contrasts if not c["told_apart"]]
    assert quiet and all(c["smallest_detectable"] == pytest.approx(
        stats.smallest_detectable(np.std(c["per_seed"], ddof=1), 3, 0.05 / 7)) for c in quiet)
    sentence = study.verdict(contrasts, plan)
    assert sentence.startswith("Paraphrase, 3 seeds, paired t-tests with Holm's correction over 7 questions: "
                               "LoRA vs FFT, SFT-only: told apart, +0.")
    assert "LoRA vs FFT, DPO-only: not told apart (per seed " in sentence and "with 80% power" in sentence


def simulated_study(rng, n_pairs, n_seeds, seed_sd, effect=0.0):
    """Synthetic per-pair correctness for the 6 paraphrase conditions, with no true difference between methods
    (or `effect` added to SFT-only LoRA): pair i is answered right with chance p_i (Beta, mean 0.89, the same for
    every model: hard pairs are hard for all), which each run (condition, seed) shifts by u ~ N(0, seed_sd)."""
    p = rng.beta(0.89 * 4, 0.11 * 4, size=n_pairs)
    items = {}
    for regime in study.REGIMES:
        for method in study.METHODS:
            shift = rng.normal(0, seed_sd, size=(n_seeds, 1)) + (effect if (regime, method) == ("sft", "lora") else 0)
            correct = rng.random((n_seeds, n_pairs)) < np.clip(p + shift, 0, 1)
            items[("paraphrase", regime, method)] = [[c.astype(np.float64)] for c in correct]
    return items


def calibration(n_pairs, seed_sd, tables, effect=0.0, n_seeds=3, seed=0):
    """Simulated tables through the study's own contrasts() (paired t-tests, Holm over the 7 questions):
    (share of tables naming any question told apart, share with "LoRA vs FFT, SFT-only" told apart, share with
    its uncorrected p < 0.05)."""
    rng = np.random.default_rng(seed)
    plan = {"tasks": ["paraphrase"], "regimes": list(study.REGIMES), "methods": list(study.METHODS)}
    any_apart = lora_apart = lora_p = 0
    for _ in range(tables):
        found = study.contrasts(plan, simulated_study(rng, n_pairs, n_seeds, seed_sd, effect))
        any_apart += any(c["told_apart"] for c in found)
        lora_apart += found[0]["told_apart"]
        lora_p += found[0]["p_value"] < 0.05
    return any_apart / tables, lora_apart / tables, lora_p / tables


def test_calibration_no_difference_is_told_apart_at_most_5_percent_of_the_time():
    """600 simulated null tables (2,000 dev pairs, 3 seeds, seed sd 0.0045): the share naming any condition told
    apart stays within Monte-Carlo error (2.6 standard errors, one-sided) of 5% or below, and so does one
    comparison's p < 0.05. A true +0.12 (LoRA after SFT; 3 seeds at Holm's 0.05 / 7 need about 9 standard
    deviations of the per-seed differences) is found in most tables. Full size: docs/study.md."""
    tables = 600
    error = 2.6 * np.sqrt(0.05 * 0.95 / tables)
    family, _, single = calibration(2000, 0.0045, tables)
    assert family <= 0.05 + error and single <= 0.05 + error
    _, power, _ = calibration(2000, 0.0045, 100, effect=0.12, seed=1)
    print(f"family-wise false positives {family:.3f}, one comparison {single:.3f}, power for +0.12: {power:.2f}")
    assert power > 0.5


if __name__ == "__main__":  # the full-size calibration of docs/study.md: python -m tests.test_study (a few minutes)
    print("dev pairs | seed sd | tables | any told apart (Holm over 7) | one comparison p < 0.05")
    for n_pairs, seed_sd, tables in [(4000, 0.0, 4000), (4000, 0.0045, 4000), (4000, 0.009, 4000),
                                     (40429, 0.0, 1000), (40429, 0.0043, 1000), (40429, 0.009, 1000)]:
        family, _, single = calibration(n_pairs, seed_sd, tables)
        se = np.sqrt(0.05 * 0.95 / tables)
        print(f"{n_pairs} | {seed_sd} | {tables} | {family:.3f} | {single:.3f} (Monte-Carlo error at 5%: {se:.3f})")
    for n_pairs, seed_sd in [(4000, 0.0045), (40429, 0.0043)]:
        _, power, single = calibration(n_pairs, seed_sd, 1000, effect=0.01, seed=1)
        print(f"true +0.01 for SFT-only LoRA, {n_pairs} pairs, seed sd {seed_sd}: told apart (Holm) {power:.3f}, "
              f"p < 0.05 uncorrected {single:.3f}")


# -----------------------------------------------------------------------------
# runs as processes: --jobs


def test_every_setting_is_a_flag_the_training_scripts_read_back(tmp_path):
    """A run's command line, parsed by the training script's own parser, is its config (save_best and
    keep_checkpoints included)."""
    plan = {"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path / "data", "device": "cpu",
            "out_dir": tmp_path, "keep_checkpoints": False}
    for task, regime, method in [c for c in study.CONDITIONS if c[1] != "simpo"]:  # simpo: the test below
        config = study.run_config(plan, task, regime, method, 11711)
        assert config["save_best"] is False and config["keep_checkpoints"] is False
        script = study.TRAINERS[regime]
        argv = jobs.command(script, config)
        assert argv[:2] == [sys.executable, str(jobs.ROOT / f"{script.__name__}.py")]
        parsed = flags.parse(argv[2:], script.SETTINGS, "")
        assert {k: parsed[k] for k in config} == config
    kept = study.run_config({**plan, "keep_checkpoints": True}, "sonnet", "sft", "fft", 11711)
    assert kept["save_best"] is True and kept["keep_checkpoints"] is True


def test_simpo_runs_are_flags_train_dpo_reads_back(tmp_path):
    plan = {"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path / "data", "device": "cpu",
            "out_dir": tmp_path, "keep_checkpoints": False}
    for task in study.TASKS:
        for method in study.METHODS:
            config = study.run_config(plan, task, "simpo", method, 11711)
            assert (config["loss_type"], config["beta"], config["simpo_gamma"]) == ("simpo", 2.0, 1.0)
            parsed = flags.parse(jobs.command(train_dpo, config)[2:], train_dpo.SETTINGS, "")
            assert {k: parsed[k] for k in config} == config


class FakeRun:
    """Stands in for a training process: finishes (writes results.json, or fails) on its second poll."""

    def __init__(self, config, fails):
        self.config, self.fails, self.polls, self.returncode = config, fails, 0, None
        self.pid = 2 ** 30  # no such process group: stopping it on the way out does nothing

    def poll(self):
        self.polls += 1
        if self.polls >= 2 and self.returncode is None:
            self.returncode = 1 if self.fails else 0
            if not self.fails:
                (Path(self.config["out_dir"]) / "results.json").write_text(
                    json.dumps({"score_name": "accuracy", "score": 0.5, "train_seconds": 1.0}))
        return self.returncode


def fake_processes(monkeypatch, failing=()):
    """Replace jobs.launch: returns the log of (run, what was running when it started, its environment)."""
    started, running = [], []

    def start(trainer, config, env):
        Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
        running[:] = [r for r in running if r.returncode is None]
        started.append((Path(config["out_dir"]).name, [Path(r.config["out_dir"]).name for r in running], env))
        running.append(FakeRun(config, Path(config["out_dir"]).name in failing))
        return running[-1]

    monkeypatch.setattr(jobs, "launch", start)
    monkeypatch.setattr(jobs.time, "sleep", lambda seconds: None)
    return started


def scheduling_plan(tmp_path, device="cpu"):
    return {"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path, "device": device,
            "out_dir": tmp_path, "keep_checkpoints": False, "seeds": [11711], "tasks": ["paraphrase"],
            "regimes": list(study.REGIMES), "methods": list(study.METHODS)}


def test_jobs_start_sft_dpo_only_after_its_sft_run_and_never_more_than_n(tmp_path, monkeypatch):
    started = fake_processes(monkeypatch)
    plan = scheduling_plan(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        results = jobs.run_in_processes(study.runs(plan), 3, plan['device'])
    assert len(results) == 6 and len(started) == 6
    for name, running, env in started:
        assert len(running) < 3
        if "sft_dpo" in name:
            assert (tmp_path / name.replace("sft_dpo", "sft") / "results.json").exists(), name
        assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 3))
    assert printed.getvalue().count("(final epoch)") == 6  # one line per finished run


def test_jobs_spread_runs_over_the_visible_gpus(tmp_path, monkeypatch):
    started = fake_processes(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = scheduling_plan(tmp_path, device="cuda")
    with contextlib.redirect_stdout(io.StringIO()):
        jobs.run_in_processes(study.runs(plan), 2, plan['device'])
    gpu = {name: env["CUDA_VISIBLE_DEVICES"] for name, _, env in started}
    assert sorted(gpu[name] for name, _, _ in started[:2]) == ["3", "5"]
    for name, running, _ in started:  # a run goes to the GPU that the run still going does not hold
        assert gpu[name] not in {gpu[other] for other in running}, (name, running)


def test_a_failed_run_skips_what_starts_from_it_and_says_so(tmp_path, monkeypatch):
    started = fake_processes(monkeypatch, failing={"paraphrase-sft-lora-seed11711"})
    plan = scheduling_plan(tmp_path)
    with pytest.raises(study.InputError) as e, contextlib.redirect_stdout(io.StringIO()):
        jobs.run_in_processes(study.runs(plan), 2, plan['device'])
    assert "paraphrase-sft_dpo-lora-seed11711" not in [name for name, _, _ in started]
    message = str(e.value)
    assert "\n" not in message and "2 run(s) failed" in message and "paraphrase-sft_dpo-lora-seed11711" in message


def numbers(rows):
    """Every figure of a table that does not depend on timing."""
    timing = {"train_seconds", "tokens_per_second", "peak_memory_bytes", "runs", "history"}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def assert_same_figures(got, expected, path="rows"):
    """Equal, except floats to 1e-6: a process with another thread count sums its matmuls in another order,
    which moves float32 log-probabilities (about -10) and so DPO's reward figures by about 1e-8 (the scores,
    counts of right answers, do not move)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for k in expected:
            assert_same_figures(got[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_figures(g, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), path
    else:
        assert got == expected, path


def test_a_study_split_over_machines_with_jobs_2_gives_the_same_table(smoke, tmp_path, monkeypatch):
    """Two "machines" share one folder, each training one method of the paraphrase task with --jobs 2
    (processes); a last --report_only reads every run and writes the table: every figure the one-process study's,
    score for score."""
    out_dir = tmp_path / "shared"
    _, printed = run_study("--out_dir", out_dir, "--tasks", "paraphrase", "--methods", "fft", "--jobs", 2)
    assert printed.count("(final epoch)") == 3 and all((p / "train.log").is_file() for p in out_dir.glob("paraphrase-*"))
    run_study("--out_dir", out_dir, "--tasks", "paraphrase", "--methods", "lora", "--jobs", 2)
    forbid_training(monkeypatch)
    run_study("--out_dir", out_dir, "--tasks", "paraphrase", "--report_only")
    split = numbers(json.loads((out_dir / "study.json").read_text())["rows"])
    one = [row for row in numbers(smoke[1]["rows"]) if row["task"] == "paraphrase"]
    assert [row["score"] for row in split] == [row["score"] for row in one]  # exactly
    for row in split + one:  # Holm's correction counts the table's comparisons: 5 here, 11 in the whole study
        for key in ("p_holm", "told_apart", "comparisons"):
            row.get("vs_sft_fft", {}).pop(key, None)
    assert_same_figures(split, one)


def test_report_only_refuses_unfinished_runs_before_anything(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path / "empty"), "--report_only", "--tasks", "paraphrase"])
    message = str(e.value.code)
    assert message.startswith("error: --report_only: 6 run(s)") and "paraphrase-sft-fft-seed11711" in message
    assert not (tmp_path / "empty").exists()


def training_processes(out_dir):
    """Live processes whose command line names out_dir (the study's training runs), by pid."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out_dir) in (proc / "cmdline").read_text() and \
                    "train_" in (proc / "cmdline").read_text() and (proc / "stat").read_text().split(")")[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def wait_for(condition, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout} s")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_study_stops_every_run_and_a_restart_resumes(sig, tmp_path):
    """Ctrl-C (SIGINT), kill (SIGTERM) and even kill -9 of the study stop every training process it started
    (the first two by passing the signal on, so each run checkpoints and exits); the study names the runs it
    interrupted and exits 128 + the signal; started again, it finishes the runs."""
    out_dir = tmp_path / "study"
    flags = ["--smoke", "--device", "cpu", "--out_dir", str(out_dir), "--jobs", "2", "--tasks", "paraphrase",
             "--regimes", "sft", "--methods", "fft,lora"]
    parent = subprocess.Popen([sys.executable, str(study.ROOT / "study.py"), *flags], cwd=study.ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        children = wait_for(lambda: len(training_processes(out_dir)) == 2 and training_processes(out_dir), 300)
        parent.send_signal(sig)
        parent.wait(timeout=90)
        wait_for(lambda: not set(children) & set(training_processes(out_dir)), 30)
    finally:
        parent.kill()
        parent.wait()
    if sig != signal.SIGKILL:
        stderr = parent.stderr.read()
        assert parent.returncode == 128 + sig and "interrupted: every run stopped; 2 run(s) interrupted" in stderr
        assert "paraphrase-sft-fft-seed11711" in stderr and "paraphrase-sft-lora-seed11711" in stderr
    if sig == signal.SIGTERM:  # resumed, the study's figures are an unbroken study's
        rows, _ = run_study(*flags[3:])
        assert [(r["regime"], r["method"]) for r in rows] == [("sft", "fft"), ("sft", "lora")]
        unbroken, _ = run_study(flags[3], tmp_path / "unbroken", *flags[5:])
        assert [r["scores"] for r in rows] == [r["scores"] for r in unbroken]
        assert [r["metrics"] for r in rows] == [r["metrics"] for r in unbroken]


# -----------------------------------------------------------------------------
# bad input: one line, before anything is trained or written


def test_a_finished_run_with_other_settings_is_refused_before_any_training(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    run = tmp_path / "paraphrase-sft-fft-seed11711"
    run.mkdir()
    config = study.run_config({"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path / "data",
                               "device": "cpu", "out_dir": tmp_path, "keep_checkpoints": False},
                              "paraphrase", "sft", "fft", 11711)
    (run / "results.json").write_text(json.dumps({"best_score": 0.5, "config": {**config, "epochs": 5}}))
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path), "--tasks", "paraphrase", "--regimes", "sft", "--methods", "fft"])
    assert str(e.value.code).startswith("error: ") and "epochs=5" in str(e.value.code) and "epochs=2" in str(e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paraphrase-sft-fft-seed11711"]  # nothing else written
    # a run trained under the old contract (score = the best epoch's) is refused too, not mixed in
    (run / "results.json").write_text(json.dumps({"config": config}))
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path), "--tasks", "paraphrase", "--regimes", "sft", "--methods", "fft"])
    assert "older train_sft" in str(e.value.code) and "\n" not in str(e.value.code)


def test_keep_checkpoints_does_not_make_finished_runs_stale(tmp_path, monkeypatch):
    """save_best and keep_checkpoints change what is kept on disk, not what is trained; SFT->DPO's init_from
    compares as <run>/last wherever the study folder is now."""
    plan = {"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path / "data", "device": "cpu",
            "out_dir": tmp_path, "keep_checkpoints": False}
    config = study.run_config(plan, "sonnet", "sft_dpo", "lora", 11711)
    moved = {**config, "init_from": "/elsewhere/sonnet-sft-lora-seed11711/last", "keep_checkpoints": True, "save_best": True}
    study.check_same_settings({"best_score": 1.0, "config": moved}, config)
    with pytest.raises(study.InputError, match="init_from"):
        study.check_same_settings({"best_score": 1.0, "config": {**moved, "init_from": "/x/sonnet-sft-fft-seed11711/last"}},
                                  config)


@pytest.mark.parametrize("flags, named", [
    (["--tasks", "poems"], "--tasks"),
    (["--regimes", "sft,rlhf"], "--regimes"),
    (["--methods", "qlora"], "--methods"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "three"], "--seeds"),
    (["--sample_seeds", "0"], "--sample_seeds"),
    (["--jobs", "0"], "--jobs"),
    (["--first_seed", "-1"], "--first_seed"),
    (["--device", "cuda:7"], "--device"),
    (["--model", "gpt5"], "--model"),
    (["--smoke", "--model", "gpt2"], "--model"),
    (["--smoke", "--preset", "full"], "--preset"),
    (["--preset", "huge"], "--preset"),
])
def test_bad_flags_are_one_line_errors_before_any_work(flags, named, tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        study.main([*flags, "--out_dir", str(out_dir)])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and named in message
    assert not out_dir.exists()


def test_the_output_folder_is_checked_before_any_data_is_read(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as e:  # the data folder is missing too, but the output folder is checked first
        study.main(["--smoke", "--out_dir", str(a_file / "study"), "--data_dir", str(tmp_path / "no-data")])
    assert str(e.value.code).startswith("error: --out_dir") and str(a_file) in str(e.value.code)


def test_smoke_without_the_samples_names_the_missing_file(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path)])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "quora-train.csv" in message
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# beyond the paper: --regimes all


def plan_of(*argv):
    return study.check_args(flags.parse(list(argv), study.SETTINGS, study.__doc__))


def test_regimes_all_plans_24_conditions_with_their_own_trainers(tmp_path):
    plan = plan_of("--smoke", "--device", "cpu", "--regimes", "all", "--out_dir", str(tmp_path / "s"))
    assert plan["regimes"] == ["sft", "dpo", "sft_dpo", "rpo", "orpo", "simpo"]
    conditions = {(t, r, m) for t in plan["tasks"] for r in plan["regimes"] for m in plan["methods"]}
    assert len(conditions) == 24 and conditions <= set(study.CONDITIONS)
    trainers = {Path(config["out_dir"]).name.split("-")[1]: trainer.__name__ for trainer, config in study.runs(plan)}
    assert trainers == {"sft": "train_sft", "dpo": "train_dpo", "sft_dpo": "train_dpo", "rpo": "train_dpo",
                        "orpo": "train_orpo", "simpo": "train_dpo"}


def test_rpo_and_orpo_rows_say_what_reference_they_paid_for(tmp_path):
    rows, printed = run_study("--tasks", "paraphrase", "--regimes", "rpo,orpo", "--methods", "lora",
                              "--out_dir", tmp_path / "s")
    by_regime = {row["regime"]: row for row in rows}
    assert set(by_regime) == {"rpo", "orpo"} and by_regime["rpo"]["reference"] == "once"
    assert by_regime["orpo"]["reference"] == "none"  # ORPO has no reference model: no reference pass at all
    assert results_of(tmp_path / "s", "paraphrase", "rpo", "lora")["config"]["rpo_alpha"] == 1.0
    assert any("| orpo" in line and "| none" in line for line in printed.splitlines()), printed


def test_simpo_rows_for_both_methods_pay_no_reference_pass(tmp_path):
    """SimPO (train_dpo --loss_type simpo) is reference-free: results.json says "reference": "none", and so does
    the row's reference pass column, for FFT and LoRA."""
    rows, printed = run_study("--tasks", "paraphrase", "--regimes", "simpo", "--out_dir", tmp_path / "s")
    assert [(r["method"], r["reference"]) for r in rows] == [("fft", "none"), ("lora", "none")]
    for method in study.METHODS:
        run = results_of(tmp_path / "s", "paraphrase", "simpo", method)
        assert run["reference"] == "none"
        assert (run["config"]["loss_type"], run["config"]["simpo_gamma"]) == ("simpo", 1.0)
    assert sum("| simpo" in line and "| none" in line for line in printed.splitlines()) == 2, printed


def test_a_fairer_lora_reaches_every_lora_condition_and_nothing_else(tmp_path):
    plan = plan_of("--smoke", "--device", "cpu", "--lora_rslora", "--lora_plus_ratio", "16",
                   "--out_dir", str(tmp_path / "s"))
    for task, regime, method in ALL:
        config = study.run_config(plan, task, regime, method, 11711)
        fair = {k: config.get(k) for k in ("lora_rslora", "lora_plus_ratio")}
        assert fair == ({"lora_rslora": True, "lora_plus_ratio": 16.0} if method == "lora" else
                        {"lora_rslora": None, "lora_plus_ratio": None})
    plain = plan_of("--smoke", "--device", "cpu", "--out_dir", str(tmp_path / "p"))
    assert "lora_rslora" not in study.run_config(plain, "sonnet", "sft", "lora", 11711)  # older runs still match
    with pytest.raises(SystemExit, match=r"error: --lora_plus_ratio 0.0: must be a positive number"):
        study.main(["--smoke", "--lora_plus_ratio", "0", "--out_dir", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()
