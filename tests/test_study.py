"""study.py end to end with --smoke (a tiny random GPT-2 on the course-format samples in ../shared/data): all 12
conditions with measured figures, a second run that trains nothing, subsets, and bad flags."""

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

import study
import train_dpo
import train_sft

ALL = [(t, r, m) for t in study.TASKS for r in study.REGIMES for m in study.METHODS]
needs_samples = pytest.mark.skipif(not study.SHARED_DATA.is_dir(), reason=f"{study.SHARED_DATA} not present")


def forbid_training(monkeypatch):
    def refuse(config):
        raise AssertionError(f"trained {config['out_dir']} again")
    monkeypatch.setattr(train_sft, "train", refuse)
    monkeypatch.setattr(train_dpo, "train", refuse)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke study, run once for the module: (out_dir, study.json, study.md, what it printed)."""
    if not study.SHARED_DATA.is_dir():
        pytest.skip(f"{study.SHARED_DATA} not present")
    out_dir = tmp_path_factory.mktemp("study") / "smoke"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        study.main(["--smoke", "--out_dir", str(out_dir), "--device", "cpu"])
    return out_dir, json.loads((out_dir / "study.json").read_text()), (out_dir / "study.md").read_text(), printed.getvalue()


def quora_dev_labels(path, limit):
    """The dev labels, read with the csv module (not the project's reader)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:limit + 1]
    return [int(float(row[3])) for row in rows]


def test_smoke_study_has_all_12_rows_with_measured_figures(smoke):
    out_dir, summary, markdown, printed = smoke
    rows = summary["rows"]
    assert [(r["task"], r["regime"], r["method"]) for r in rows] == ALL
    for row in rows:
        assert row["seeds"] == [study.FIRST_SEED]
        for key in ("train_seconds", "tokens_per_second", "peak_memory_bytes", "trainable_parameters"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["task"], row["regime"], row["method"], key)
        low, high = row["ci95"]
        assert low <= high and math.isfinite(low) and math.isfinite(high)
        top = 1 if row["task"] == "paraphrase" else 100
        assert 0 <= low <= row["score"] <= high <= top, row  # 30 pairs / 12 sonnets: the interval is wide
        total = row["total_parameters"]
        assert row["trainable_parameters"] == total if row["method"] == "fft" else 0 < row["trainable_parameters"] < total / 50
        run = json.loads((out_dir / f"{row['task']}-{row['regime']}-{row['method']}-seed11711" / "results.json").read_text())
        assert row["score"] == run["score"] and run["regime"] == row["regime"] and run["method"] == row["method"]
    # SFT->DPO costs both stages: its train_seconds include the SFT run's
    for task in study.TASKS:
        for method in study.METHODS:
            sft = next(r for r in rows if (r["task"], r["regime"], r["method"]) == (task, "sft", method))
            staged = next(r for r in rows if (r["task"], r["regime"], r["method"]) == (task, "sft_dpo", method))
            assert staged["train_seconds"] > sft["train_seconds"]
    assert "SMOKE" in markdown and "| task" in markdown and summary["verdict"] in markdown
    assert markdown.count("\n| paraphrase ") == 6 and markdown.count("\n| sonnet ") == 6
    assert markdown.split("\n\n")[2] in printed  # the same table is printed


def test_plots_or_how_to_get_them(smoke):
    """With matplotlib (an optional extra) a PNG per task, linked from study.md; without it, how to get them."""
    out_dir, summary, markdown, _ = smoke
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert summary["plots"] is None and "pip install matplotlib" in markdown
        return
    assert summary["plots"] == ["study-paraphrase.png", "study-sonnet.png"]
    for name in summary["plots"]:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in markdown


def test_scores_and_paired_differences_follow_from_the_predictions(smoke):
    """The table's accuracy and its difference from SFT-only FFT, recomputed by hand from each run's saved dev
    predictions and the dev file; McNemar's p from scipy's exact binomial test on the discordant pairs."""
    scipy_stats = pytest.importorskip("scipy.stats")
    out_dir, summary, _, _ = smoke
    labels = quora_dev_labels(out_dir / "data" / "quora-dev.csv", study.PRESETS["smoke"]["paraphrase"]["dev_limit"])

    def correct(regime, method):
        saved = json.loads((out_dir / f"paraphrase-{regime}-{method}-seed11711" / "best_dev_predictions.json").read_text())
        return [int(p == y) for p, y in zip(saved["predictions"], labels, strict=True)]

    baseline = correct("sft", "fft")
    for row in [r for r in summary["rows"] if r["task"] == "paraphrase"]:
        mine = correct(row["regime"], row["method"])
        assert row["score"] == pytest.approx(sum(mine) / len(labels))
        if row["regime"] == "sft" and row["method"] == "fft":
            assert "vs_sft_fft" not in row
            continue
        only_mine = sum(a and not b for a, b in zip(mine, baseline))
        only_base = sum(b and not a for a, b in zip(mine, baseline))
        versus = row["vs_sft_fft"]
        assert versus["difference"] == pytest.approx((only_mine - only_base) / len(labels))
        expected = 1.0 if only_mine + only_base == 0 else scipy_stats.binomtest(only_mine, only_mine + only_base).pvalue
        assert versus["p_values"] == [pytest.approx(expected)]
    for row in [r for r in summary["rows"] if r["task"] == "sonnet" and (r["regime"], r["method"]) != ("sft", "fft")]:
        low, high = row["vs_sft_fft"]["ci95"]
        assert low <= row["vs_sft_fft"]["difference"] <= high


def test_a_second_run_trains_nothing(smoke, monkeypatch):
    out_dir, summary, _, _ = smoke
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.glob("*/results.json")}
    assert len(stamps) == 12
    forbid_training(monkeypatch)
    rows = study.main(["--smoke", "--out_dir", str(out_dir), "--device", "cpu"])
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*/results.json")} == stamps
    assert [r["score"] for r in rows] == [r["score"] for r in summary["rows"]]


def test_tasks_regimes_and_methods_select_conditions(smoke, monkeypatch):
    out_dir, _, _, _ = smoke
    forbid_training(monkeypatch)
    rows = study.main(["--smoke", "--out_dir", str(out_dir), "--device", "cpu", "--tasks", "sonnet",
                       "--regimes", "sft_dpo,dpo", "--methods", "lora"])
    assert [(r["task"], r["regime"], r["method"]) for r in rows] == [("sonnet", "dpo", "lora"), ("sonnet", "sft_dpo", "lora")]
    written = json.loads((out_dir / "study.json").read_text())
    assert [(r["task"], r["regime"], r["method"]) for r in written["rows"]] == [("sonnet", "dpo", "lora"),
                                                                              ("sonnet", "sft_dpo", "lora")]
    assert "vs_sft_fft" not in written["rows"][0]  # the baseline was not selected: nothing to pair with
    assert "No paired differences" in written["verdict"]


def test_an_interrupted_study_trains_only_what_is_missing(smoke, monkeypatch):
    """A run without results.json (the study stopped during it) is trained again, resuming from its checkpoint;
    every other run is read back."""
    out_dir, summary, _, _ = smoke
    (out_dir / "sonnet-sft_dpo-lora-seed11711" / "results.json").unlink()
    trained, real_train = [], train_dpo.train
    forbid_training(monkeypatch)
    monkeypatch.setattr(train_dpo, "train", lambda config: trained.append(config) or real_train(config))
    rows = study.main(["--smoke", "--out_dir", str(out_dir), "--device", "cpu"])
    assert [(Path(c["out_dir"]).name, c["resume"]) for c in trained] == [("sonnet-sft_dpo-lora-seed11711", True)]
    assert [r["score"] for r in rows] == [r["score"] for r in summary["rows"]]


def test_dpo_runs_share_one_cache(smoke):
    """DPO-only FFT and LoRA start from the same model, so they share reference log-probabilities and sampled
    rejections: 3 starting models per task (GPT-2, SFT FFT, SFT LoRA), each with a train and a dev file."""
    cache = smoke[0] / "cache"
    assert len(list(cache.glob("reference-train-*"))) == 6 and len(list(cache.glob("reference-dev-*"))) == 6
    assert len(list(cache.glob("rejections-*"))) == 6  # sonnets only


@needs_samples
def test_a_finished_run_with_other_settings_is_refused_before_any_training(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    run = tmp_path / "paraphrase-sft-fft-seed11711"
    run.mkdir()
    config = study.run_config({"preset": "smoke", "model": str(tmp_path / "tiny-gpt2"), "data_dir": tmp_path / "data",
                               "device": "cpu", "out_dir": tmp_path}, "paraphrase", "sft", "fft", 11711)
    (run / "results.json").write_text(json.dumps({"config": {**config, "epochs": 5}}))
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path), "--tasks", "paraphrase", "--regimes", "sft", "--methods", "fft"])
    assert str(e.value.code).startswith("error: ") and "epochs=5" in str(e.value.code) and "epochs=1" in str(e.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paraphrase-sft-fft-seed11711"]  # nothing else written


@pytest.mark.parametrize("flags, named", [
    (["--tasks", "poems"], "--tasks"),
    (["--regimes", "sft,rlhf"], "--regimes"),
    (["--methods", "qlora"], "--methods"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "three"], "--seeds"),
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


def test_an_unwritable_out_dir_is_refused(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(a_file / "study")])
    assert str(e.value.code).startswith("error: --out_dir") and str(a_file) in str(e.value.code)


def test_smoke_says_what_it_needs_without_the_samples(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    monkeypatch.setattr(study, "SHARED_DATA", tmp_path / "no-shared-data")
    with pytest.raises(SystemExit) as e:
        study.main(["--smoke", "--out_dir", str(tmp_path / "out")])
    message = str(e.value.code)
    assert message.startswith("error: --smoke") and "quora-train-30.csv" in message and "--data_dir" in message
    assert not (tmp_path / "out").exists()


def test_several_seeds_give_a_mean_and_a_spread(smoke):
    """--seeds 2: each row is the mean and sample standard deviation of its runs (numpy as the oracle), and the
    paired test against SFT-only FFT is done seed by seed. Trains only the two new seed-11712 runs."""
    out_dir = smoke[0]
    rows = study.main(["--smoke", "--out_dir", str(out_dir), "--device", "cpu", "--seeds", "2", "--tasks", "paraphrase",
                       "--regimes", "sft,dpo", "--methods", "fft"])
    for row in rows:
        runs = [json.loads((out_dir / f"paraphrase-{row['regime']}-fft-seed{s}" / "results.json").read_text())
                for s in (11711, 11712)]
        assert row["seeds"] == [11711, 11712] and row["scores"] == [r["score"] for r in runs]
        assert row["score"] == pytest.approx(np.mean(row["scores"]))
        assert row["score_std"] == pytest.approx(np.std(row["scores"], ddof=1), abs=1e-12)
        assert row["train_seconds"] == pytest.approx(np.mean([r["train_seconds"] for r in runs]))
    assert len(rows[1]["vs_sft_fft"]["p_values"]) == 2 and "max over seeds" in (out_dir / "study.md").read_text()


@needs_samples
def test_smoke_data_dir_copies_the_samples_under_the_course_names(smoke):
    out_dir, _, _, _ = smoke
    for name, sample in study.SMOKE_FILES.items():
        assert (out_dir / "data" / name).read_bytes() == (study.SHARED_DATA / sample).read_bytes()


def test_a_clear_difference_is_told_apart_and_named():
    """The paired comparisons' positive branch, on made-up predictions: a model right on all 40 pairs where the
    baseline is wrong on 12 (McNemar p from scipy), and sonnets copied from the references against nonsense."""
    scipy_stats = pytest.importorskip("scipy.stats")
    labels = [i % 2 for i in range(40)]
    base = [1 - y if i < 12 else y for i, y in enumerate(labels)]
    para = study.versus_baseline("paraphrase", [labels], [base], labels)
    assert para["difference"] == pytest.approx(12 / 40)
    assert para["p_values"] == [pytest.approx(scipy_stats.binomtest(12, 12).pvalue)] and para["told_apart"]
    references = ["Shall I compare thee to a summer's day?", "When forty winters shall besiege thy brow",
                  "Look in thy glass and tell the face thou viewest", "Music to hear, why hear'st thou music sadly?"]
    sonnets = study.versus_baseline("sonnet", [references], [["zzz qqq"] * 4], references)
    assert sonnets["difference"] > 50 and sonnets["ci95"][0] > 0 and sonnets["told_apart"]
    rows = [{"task": "paraphrase", "regime": "dpo", "method": "lora", "vs_sft_fft": para},
            {"task": "sonnet", "regime": "sft", "method": "lora", "vs_sft_fft": {**sonnets, "told_apart": False}}]
    sentence = study.verdict(rows, {"dev": {"paraphrase": labels, "sonnet": dict(enumerate(references))}, "seeds": [1]})
    assert "can tell apart paraphrase DPO-only LoRA (" in sentence and "but not sonnets SFT-only LoRA:" in sentence
    assert "40 dev pairs and 4 dev sonnets" in sentence
