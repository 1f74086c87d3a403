"""plot.py: each picture holds exactly the numbers of the log or study it was drawn from (read back from the
figure), a killed run's cut-short last line is skipped, and without matplotlib each function says how to get it."""

import json

import pytest

import plot
from fileio import InputError

needs_matplotlib = pytest.mark.skipif(plot.Figure is None, reason="matplotlib (requirements-test.txt) is not installed")


def write_log(run_dir, steps=12, eval_every=4, cut_short=True):
    """A log.jsonl as a run writes it: a training line per step, an evaluation line every `eval_every` steps and,
    when `cut_short`, half of one more line, as a run killed mid-write leaves it. Returns (train, evals)."""
    train = [{"step": s, "epoch": s / 8, "loss": 3.0 / s, "lr": 1e-4 * min(1.0, s / 3), "grad_norm": 1.0 + s,
              "tokens_per_second": 1000.0, "elapsed": 0.5 * s} for s in range(1, steps + 1)]
    evals = [{"step": s, "epoch": s / 8, "elapsed": 0.5 * s, "dev": {"score": 0.5 + s / 100, "accuracy": 0.5}}
             for s in range(eval_every, steps + 1, eval_every)]
    lines = sorted(train + evals, key=lambda r: (r["step"], "dev" in r))
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run_dir / "log.jsonl").write_text(text + json.dumps(train[0])[:17] if cut_short else text)
    return train, evals


@pytest.fixture
def figures(monkeypatch):
    """Every figure plot.py saves, by file name, as well as the file itself."""
    saved = {}
    real_save = plot.save

    def save(fig, path):
        saved[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plot, "save", save)
    return saved


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_log_skips_only_a_cut_short_last_line(tmp_path):
    train, evals = write_log(tmp_path)
    assert plot.read_log(tmp_path) == (train, evals)
    text = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "log.jsonl").write_text(text + "\n")  # a finished line, so not a write cut short: an error
    with pytest.raises(InputError, match=rf"log.jsonl:{len(train) + len(evals) + 1}: not a line of JSON"):
        plot.read_log(tmp_path)
    (tmp_path / "log.jsonl").write_text(text.replace("\n", "\n{oops\n", 1))
    with pytest.raises(InputError, match=r"log.jsonl:2: not a line of JSON"):
        plot.read_log(tmp_path)


@needs_matplotlib
def test_plot_run_draws_the_loss_learning_rate_and_dev_score_of_the_log(tmp_path, figures):
    train, evals = write_log(tmp_path)
    path = plot.plot_run(tmp_path)
    assert path == tmp_path / "curves.png" and is_png(path)
    loss_axis, dev_axis, lr_axis = figures["curves.png"].axes
    assert loss_axis.lines[0].get_xydata().tolist() == [[r["step"], r["loss"]] for r in train]
    assert lr_axis.lines[0].get_xydata().tolist() == [[r["step"], r["lr"]] for r in train]
    assert dev_axis.lines[0].get_xydata().tolist() == [[r["step"], r["dev"]["score"]] for r in evals]


def conditions():
    """Two tasks, FFT and LoRA, with curves and intervals that differ from condition to condition."""
    rows = []
    for t, task in enumerate(["paraphrase", "sonnet"]):
        for i, (regime, method) in enumerate([("sft", "fft"), ("sft", "lora"), ("sft_dpo", "lora")]):
            score = 0.6 + 0.05 * i + t
            rows.append({"label": f"{regime} {method}", "task": task, "regime": regime, "method": method,
                         "score": score, "ci": [score - 0.02 * (i + 1), score + 0.03],
                         "train_seconds": 10.0 * 3 ** i, "dev_curve": [[1, score - 0.1], [2, score]],
                         "train_curve": [[s, (i + 1) / s] for s in (1, 5, 9)]})
    return rows


@needs_matplotlib
def test_study_figures_draw_each_conditions_curves_and_its_cost_and_quality(tmp_path, figures):
    rows = conditions()
    paths = plot.study_figures(rows, tmp_path)
    assert [p.name for p in paths] == ["curves-paraphrase.png", "cost-quality-paraphrase.png",
                                       "curves-sonnet.png", "cost-quality-sonnet.png"]
    assert all(is_png(p) for p in paths)
    for task in ("paraphrase", "sonnet"):
        mine = [r for r in rows if r["task"] == task]
        train_axis, dev_axis = figures[f"curves-{task}.png"].axes
        assert [line.get_xydata().tolist() for line in train_axis.lines] == [r["train_curve"] for r in mine]
        assert [line.get_xydata().tolist() for line in dev_axis.lines] == [r["dev_curve"] for r in mine]
        assert [line.get_linestyle() for line in dev_axis.lines] == ["-", "--", "--"]
        (axis,) = figures[f"cost-quality-{task}.png"].axes
        assert axis.get_xscale() == "log"
        drawn = {}
        for container in axis.containers:  # one errorbar per method: its points and the ends of its bars
            points = container.lines[0].get_xydata().tolist()
            bars = [segment.tolist() for segment in container.lines[2][0].get_segments()]
            drawn[container.get_label()] = list(zip(points, bars))
        for method, name in [("fft", "FFT"), ("lora", "LoRA")]:
            assert drawn[name] == [([r["train_seconds"], r["score"]],
                                    [[r["train_seconds"], r["ci"][0]], [r["train_seconds"], r["ci"][1]]])
                                   for r in mine if r["method"] == method]
        assert [text.get_text() for text in axis.texts] == [r["regime"] for r in mine]


def test_without_matplotlib_each_function_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plot, "Figure", None)
    write_log(tmp_path)
    assert plot.plot_run(tmp_path) is None
    assert plot.study_figures(conditions(), tmp_path) == []
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("pip install matplotlib" in line for line in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


@needs_matplotlib
def test_the_command_line_takes_a_run_folder_with_or_without_the_flag(tmp_path, capsys):
    write_log(tmp_path, cut_short=False)
    assert plot.main([str(tmp_path)]) == tmp_path / "curves.png"
    assert plot.main(["--run", str(tmp_path)]) == tmp_path / "curves.png"
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'curves.png'}"] * 2


@pytest.mark.parametrize("where, says", [("missing", "no such folder"), ("empty", "log.jsonl: not found")])
def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, where, says):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit:
        plot.main(["--run", str(tmp_path / where)])
    message = str(exit.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message
