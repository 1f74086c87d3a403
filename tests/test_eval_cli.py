"""eval.py's command line: both tasks end to end, every bad argument refused before any work, file names."""

import os
import re
import shutil

import pytest
import torch

import eval as evaluation
import flags
from conftest import tiny_config
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example, paraphrase_prompt, read_quora
from data.sonnets import read_sonnets
from data.tokenizer import decode, encode
from fileio import InputError
from checkpoint import from_pretrained, save_pretrained
from model import GPT


@pytest.fixture
def data_dir(sample_data, tmp_path):
    """A copy of the samples' evaluation files (no quora-train.csv, no sonnets.txt)."""
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("quora-dev.csv", "quora-test-student.csv", "sonnets_held_out_dev.txt",
                 "TRUE_sonnets_held_out_dev.txt", "sonnets_held_out.txt"):
        shutil.copy(sample_data / name, directory / name)
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    directory = tmp_path / "tiny"
    save_pretrained(GPT(tiny_config()), directory)
    return directory


def run_cli(*args):
    return evaluation.main([*map(str, args), "--device", "cpu"])


# -----------------------------------------------------------------------------
# both tasks end to end, with the dashed (old) and snake_case (new) flag names


def test_cli_scores_paraphrases(hub_checkpoint, data_dir, tmp_path, capsys):
    directory, _ = hub_checkpoint
    r = run_cli("--task", "paraphrase", "--checkpoint", directory, "--data-dir", data_dir, "--out-dir", tmp_path / "p",
                "--limit", 10, "--batch-size", 4)
    out = capsys.readouterr().out  # the score line names the course's figures
    assert f"paraphrase dev: accuracy {r['accuracy']:.4f}  macro-F1 {r['f1']:.4f} (the course's" in out
    assert (f"yes/no accuracy {r['yes_no_accuracy']:.4f}  macro-F1 {r['yes_no_f1']:.4f}  yes/no share "
            f"{r['yes_no_share']:.4f}  (10 pairs") in out
    lines = (tmp_path / "p" / f"{directory.name}-para-dev-limit10-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Is_Paraphrase " and len(lines) == 11
    run_cli("--task", "paraphrase", "--checkpoint", directory, "--data_dir", data_dir, "--out_dir", tmp_path / "p",
            "--split", "test", "--batch_size", 8)
    assert "paraphrase test: (no labels)" in capsys.readouterr().out
    lines = (tmp_path / "p" / f"{directory.name}-para-test-output.csv").read_text().splitlines()
    assert len(lines) == 21  # the course's base name for a full run: the header and 20 pairs
    assert len(list((tmp_path / "p").iterdir())) == 2  # two runs, two files, no temporary file left


def test_cli_scores_sonnets(tiny_checkpoint, data_dir, tmp_path, capsys):
    run_cli("--task", "sonnet", "--checkpoint", tiny_checkpoint, "--data_dir", data_dir, "--out_dir", tmp_path / "s",
            "--max_new_tokens", 8, "--limit", 3, "--top_p", 0.5, "--temperature", 0.7)
    out = capsys.readouterr().out
    assert "sonnet dev: chrF" in out and "(3 sonnets" in out
    written = tmp_path / "s" / "tiny-sonnets-dev-limit3-temp0.7-topp0.5-tokens8.txt"
    assert len(read_sonnets(written)) == 3
    run_cli("--task", "sonnet", "--checkpoint", tiny_checkpoint, "--data-dir", data_dir, "--out-dir", tmp_path / "s",
            "--max-new-tokens", 8, "--limit", 3, "--top-p", 0.5, "--temperature", 0.7, "--seed", 1)
    assert (tmp_path / "s" / "tiny-sonnets-dev-limit3-seed1-temp0.7-topp0.5-tokens8.txt").is_file()
    assert len(read_sonnets(written)) == 3  # the first run's file is still there


def args_for(task, **overrides):
    return {**{name: row[0] for name, row in evaluation.SETTINGS.items()}, "task": task, **overrides}


def test_prediction_files_are_named_by_what_changes_them(tiny_checkpoint, tmp_path):
    name = lambda task, **kw: evaluation.prediction_file(args_for(task, **kw)).name  # noqa: E731
    # the default runs keep the course's names
    assert name("paraphrase") == "gpt2-para-dev-output.csv"
    assert name("sonnet", split="test") == "gpt2-sonnets-test.txt"
    assert name("paraphrase", limit=200) == "gpt2-para-dev-limit200-output.csv"
    # batch size and generation settings do not change paraphrase predictions, so not their file name
    assert name("paraphrase", batch_size=8, seed=3, temperature=0.0) == "gpt2-para-dev-output.csv"
    assert name("sonnet", limit=5, seed=1, temperature=0.0, top_p=1.0, max_new_tokens=64, batch_size=4) == (
        "gpt2-sonnets-dev-limit5-seed1-temp0.0-topp1.0-tokens64-batch4.txt")
    assert name("sonnet", seed=11711, temperature=1.2, top_p=0.9) == "gpt2-sonnets-dev.txt"  # defaults, spelled out
    assert name("paraphrase", checkpoint=str(tiny_checkpoint), adapter=str(tmp_path / "a.safetensors")) == (
        "tiny+a-para-dev-output.csv")
    assert name("paraphrase", checkpoint="openai-community/gpt2-medium") == "gpt2-medium-para-dev-output.csv"


# -----------------------------------------------------------------------------
# bad input: one line naming the flag and the value, before the data is read or a model loaded, nothing left


@pytest.fixture
def no_cuda_no_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded where none is needed yet")


@pytest.fixture
def refuse_to_load(monkeypatch):
    monkeypatch.setattr(evaluation, "load_model", refuse)


BAD_ARGUMENTS = [  # (arguments, what the one-line error must say)
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--batch-size", "-2"], "--batch_size -2: must be at least 1"),
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--limit", "-5"], "--limit -5: must be at least 1"),
    (["--max_new_tokens", "-3"], "--max_new_tokens -3: must be at least 1"),
    (["--seed", "-1"], r"--seed -1: must be in \[0, 2\*\*64\)"),
    (["--seed", str(2 ** 64)], "--seed 18446744073709551616: must be in"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be >= 0"),
    (["--top_p", "1.5"], r"--top_p 1.5: must be in \(0, 1\]"),
    (["--top-p", "0"], r"--top_p 0.0: must be in \(0, 1\]"),
    (["--device", "cuda"], "--device 'cuda': CUDA is not available on this machine; valid here: cpu$"),
    (["--device", "cuda:1"], "--device 'cuda:1': CUDA is not available on this machine; valid here: cpu$"),
    (["--device", "mps"], "--device 'mps': MPS is not available on this machine; valid here: cpu$"),
    (["--device", "banana"], "--device 'banana': not a device name; valid here: cpu$"),
    (["--checkpoint", "gtp2"], "--checkpoint 'gtp2': neither a GPT-2 name .*gpt2-medium.* nor an existing directory"),
    (["--adapter", "missing.safetensors"], "--adapter 'missing.safetensors': no such file"),
    (["--task", "sonnet", "--split", "train"], "--split train: --task sonnet has a dev and a test split"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_first(extra, message, tiny_checkpoint, tmp_path, no_cuda_no_mps, refuse_to_load):
    out_dir = tmp_path / "new" / "predictions"
    argv = ["--task", "paraphrase", "--checkpoint", str(tiny_checkpoint), "--data_dir", str(tmp_path / "no-data"),
            "--out_dir", str(out_dir), "--device", "cpu", *extra]  # a later flag wins over an earlier one
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error
    assert exit_info.value.code != 0
    assert re.search(message, error), error
    assert not (tmp_path / "new").exists()  # nothing left behind, not even the output folder


def test_unwritable_out_dir_is_refused_first(tiny_checkpoint, tmp_path, refuse_to_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = ["--task", "paraphrase", "--checkpoint", str(tiny_checkpoint), "--data_dir", str(tmp_path / "no-data")]
    with pytest.raises(SystemExit, match=re.escape(f"error: --out_dir '{a_file}': is a file, not a directory")):
        evaluation.main([*base, "--out_dir", str(a_file), "--device", "cpu"])
    with pytest.raises(SystemExit, match=re.escape(f"error: --out_dir '{a_file / 'sub'}': cannot be created or "
                                                   "written (Not a directory)")):
        evaluation.main([*base, "--out_dir", str(a_file / "sub"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_out_dir_is_refused_first(tiny_checkpoint, tmp_path, refuse_to_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SystemExit, match=r"error: --out_dir .*locked/out': cannot be created or written"):
            evaluation.main(["--task", "paraphrase", "--checkpoint", str(tiny_checkpoint), "--out_dir",
                             str(locked / "out"), "--device", "cpu"])
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_errors_after_the_checks_leave_nothing_behind(hub_checkpoint, data_dir, tmp_path):
    out_dir = tmp_path / "new" / "predictions"
    with pytest.raises(SystemExit, match="error: .*neither a GPT-2 name"):
        run_cli("--task", "paraphrase", "--checkpoint", tmp_path / "missing", "--data-dir", data_dir)
    # the data is read before the model is loaded (or downloaded), so a missing file fails at once
    with pytest.raises(SystemExit, match="error: .*quora-train.csv: no such file"):
        run_cli("--task", "paraphrase", "--checkpoint", "gpt2", "--split", "train", "--data_dir", data_dir,
                "--out_dir", out_dir)
    # a directory that is not a checkpoint passes the first check and fails when loaded, with its file named
    with pytest.raises(SystemExit, match="error: .*config.json: no such file"):
        run_cli("--task", "paraphrase", "--checkpoint", data_dir, "--data_dir", data_dir, "--out_dir", out_dir)
    assert not (tmp_path / "new").exists()


# -----------------------------------------------------------------------------
# flags.check_device, which eval.py and the training scripts use


def test_check_device_names_what_this_machine_has(monkeypatch, no_cuda_no_mps):
    assert flags.check_device("cpu") == "cpu"
    with pytest.raises(InputError, match="--device 'cuda': CUDA is not available on this machine; valid here: cpu"):
        flags.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [flags.check_device(d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda", "cuda:0", "cuda:1"]
    with pytest.raises(InputError, match="'cuda:2': this machine has 2 CUDA device.*valid here: cpu, cuda, cuda:0, "
                                         "cuda:1$"):
        flags.check_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert flags.check_device("mps") == "mps"
    with pytest.raises(InputError, match="^--init_device 'gpu': not a device name"):
        flags.check_device("gpu", flag="--init_device")


# -----------------------------------------------------------------------------
# prompts and generation lengths against the model's positions, checked before any weights are loaded


def sonnet_cli_error(*extra):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--task", "sonnet", "--device", "cpu", *map(str, extra)])
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error
    return error


def test_max_new_tokens_beyond_the_models_positions_is_refused_first(tiny_checkpoint, tmp_path, refuse_to_load):
    out_dir = tmp_path / "new"
    assert sonnet_cli_error("--checkpoint", "gpt2", "--max_new_tokens", 5000, "--out_dir", out_dir) == (
        "error: --max_new_tokens 5000: the model (gpt2) has 1024 positions for the prompt and the new tokens "
        "together; give at most 1023")
    assert sonnet_cli_error("--checkpoint", tiny_checkpoint, "--max_new_tokens", 128, "--out_dir", out_dir) == (
        f"error: --max_new_tokens 128: the model ({tiny_checkpoint}) has 128 positions for the prompt and the new "
        f"tokens together; give at most 127")
    assert not out_dir.exists()


def test_a_sonnet_prompt_that_does_not_fit_is_named_before_loading(tiny_checkpoint, data_dir, tmp_path,
                                                                     refuse_to_load):
    first = read_sonnets(data_dir / "sonnets_held_out_dev.txt")[0]
    n = len(encode(first.text))  # tiktoken, the oracle for the prompt's length
    error = sonnet_cli_error("--checkpoint", tiny_checkpoint, "--data_dir", data_dir, "--max_new_tokens", 129 - n,
                             "--out_dir", tmp_path / "new")
    assert error == (f"error: {data_dir / 'sonnets_held_out_dev.txt'}: sonnet {first.number}'s prompt is {n} tokens; "
                     f"with --max_new_tokens {129 - n} that makes 129, more than the model's 128 positions; give "
                     f"--max_new_tokens at most {128 - n}")
    assert not (tmp_path / "new").exists()


def long_pair_row(pair_id, words, label="\t1.0"):
    """A Quora row whose first question alone is far longer than 128 tokens."""
    return f"{pair_id}\tIs {' '.join(['very'] * words)} long a problem?\tIs length a problem?{label}\n"


def test_a_quora_prompt_longer_than_the_model_is_an_error_in_labelled_data(tiny_checkpoint, data_dir, tmp_path,
                                                                             refuse_to_load):
    dev = data_dir / "quora-dev.csv"
    dev.write_text(dev.read_text() + long_pair_row("9 long-one", 200) + long_pair_row("10 long-two", 300))
    n = len(paraphrase_example(read_quora(dev)[30]).prompt)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--task", "paraphrase", "--checkpoint", tiny_checkpoint, "--data_dir", data_dir, "--out_dir",
                tmp_path / "new")
    assert exit_info.value.code == (f"error: {dev}: pair 31 (id 9 long-one) makes a prompt of {n} tokens, more than "
                                    f"the model's 128 positions (and 1 more); shorten its questions or remove it")
    assert not (tmp_path / "new").exists()


def test_the_test_split_predicts_every_pair_keeping_the_end_of_a_long_prompt(tiny_checkpoint, data_dir, tmp_path,
                                                                               capsys):
    test = data_dir / "quora-test-student.csv"
    test.write_text(test.read_text() + long_pair_row("9 long-one", 200, "") + long_pair_row("10 long-two", 300, ""))
    run_cli("--task", "paraphrase", "--checkpoint", tiny_checkpoint, "--data_dir", data_dir, "--out_dir", tmp_path,
            "--split", "test", "--batch_size", 4)
    err = capsys.readouterr().err
    assert f"warning: {test}: 2 of 22 prompts are longer than the model's 128 positions (the first: pair 21, id " \
           f"9 long-one" in err and "each keeps its last 128 tokens" in err
    lines = (tmp_path / "tiny-para-test-output.csv").read_text().splitlines()
    assert [line.rsplit(", ", 1)[0] for line in lines[1:]] == [p.id for p in read_quora(test)]  # every pair
    # each long pair's prediction is the model's answer after the last 128 tokens of its prompt
    model = from_pretrained(tiny_checkpoint).eval()
    for pair, line in zip(read_quora(test)[-2:], lines[-2:]):
        prompt = encode(paraphrase_prompt(pair.sentence1, pair.sentence2))
        assert len(prompt) > 128
        assert decode(prompt[-128:]).endswith('"is length a problem ?\nAre these questions asking the same thing?\n')
        with torch.no_grad():
            logits = model(torch.tensor([prompt[-128:]]))[0, -1]
        assert line == f"{pair.id}, {int(logits[YES_TOKEN] > logits[NO_TOKEN])} "


# -----------------------------------------------------------------------------
# --predictions: a submission file scored with no model, as the model's own run and the course's code score it


def course_test_sonnet(test_path, gold_path):
    """The course's evaluation.test_sonnet, the oracle: each file split on its number lines (its SonnetsDataset),
    the i-th sonnet against the i-th, as many as the shorter file holds, sacrebleu's corpus chrF."""
    sacrebleu = pytest.importorskip("sacrebleu")
    generated, true = ([s.strip() for s in re.split(r"\n\s*\d+\s*\n", path.read_text())[1:]]
                       for path in (test_path, gold_path))
    n = min(len(generated), len(true))
    return sacrebleu.metrics.CHRF().corpus_score(generated[:n], [true[:n]]).score


def score_file(task, path, data_dir, *extra):
    return evaluation.main(["--task", task, "--predictions", str(path), "--data_dir", str(data_dir), *extra])


def test_sonnet_predictions_equal_the_checkpoint_run_and_the_courses_evaluation(tiny_checkpoint, data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    ran = run_cli("--task", "sonnet", "--checkpoint", tiny_checkpoint, "--data_dir", data_dir, "--out_dir", tmp_path,
                  "--max_new_tokens", 8, "--limit", 3)
    ours = tmp_path / "tiny-sonnets-dev-limit3-tokens8.txt"
    theirs = tmp_path / "generated_sonnets.txt"  # the same sonnets as the course's starter writes them: 0, 1, 2
    theirs.write_text("--Generated Sonnets-- \n\n" + "".join(f"\n{i}\n{text}\n\n" for i, (_, text) in
                                                             enumerate(ran["sonnets"])))
    monkeypatch.setattr(evaluation, "load_model", refuse)
    capsys.readouterr()
    for path in (ours, theirs):
        scored = score_file("sonnet", path, data_dir)
        assert scored == {"chrf": ran["chrf"], "n": 3}
        assert scored["chrf"] == pytest.approx(course_test_sonnet(path, data_dir / "TRUE_sonnets_held_out_dev.txt"),
                                               abs=1e-9)
    true = data_dir / "TRUE_sonnets_held_out_dev.txt"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"sonnet dev: chrF {ran['chrf']:.2f}  (3 sonnets of {theirs}, against {true})")


@pytest.mark.parametrize("where", ["sample_data", "course_data"])
def test_sonnet_predictions_on_the_courses_files(where, request):
    directory = request.getfixturevalue(where)
    true = directory / "TRUE_sonnets_held_out_dev.txt"
    prompts_alone = score_file("sonnet", directory / "sonnets_held_out_dev.txt", directory)
    assert prompts_alone["chrf"] == pytest.approx(course_test_sonnet(directory / "sonnets_held_out_dev.txt", true),
                                                  abs=1e-9)
    assert score_file("sonnet", true, directory) == {"chrf": pytest.approx(100.0), "n": len(read_sonnets(true))}


def rigged_checkpoint(directory):
    """A tiny model whose argmax is "yes", "no", or a third token (",") by prompt, saved in the hub's layout."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for token in (YES_TOKEN, NO_TOKEN, 11):
            model.lm_head.weight[token] = torch.randn(model.config.n_embd, generator=generator)
    save_pretrained(model, directory)
    return directory


def test_paraphrase_predictions_equal_the_checkpoint_run_and_sklearn(data_dir, tmp_path, monkeypatch):
    metrics = pytest.importorskip("sklearn.metrics")
    checkpoint = rigged_checkpoint(tmp_path / "rigged")
    ran = run_cli("--task", "paraphrase", "--checkpoint", checkpoint, "--data_dir", data_dir, "--out_dir", tmp_path)
    ran_10 = run_cli("--task", "paraphrase", "--checkpoint", checkpoint, "--data_dir", data_dir, "--out_dir", tmp_path,
                     "--limit", 10)
    pairs = read_quora(data_dir / "quora-dev.csv")
    labels, tokens = [p.label for p in pairs], ran["predicted_tokens"]
    assert {YES_TOKEN, NO_TOKEN} < set(tokens) and 0 < ran["accuracy"] < ran["yes_no_accuracy"]
    # the course's starter writes its argmax tokens, with the ids in lower case; here in the opposite order
    theirs = tmp_path / "para-dev-output.csv"
    theirs.write_text("id \t Predicted_Is_Paraphrase \n" + "".join(f"{pairs[i].id.lower()}, {tokens[i]} \n"
                                                                    for i in reversed(range(len(pairs)))))
    monkeypatch.setattr(evaluation, "load_model", refuse)
    ours = score_file("paraphrase", tmp_path / "rigged-para-dev-output.csv", data_dir)
    assert ours == {"accuracy": ran["yes_no_accuracy"], "f1": ran["yes_no_f1"], "n": 30}
    assert ours["f1"] == pytest.approx(metrics.f1_score(labels, ran["predictions"], average="macro"))
    scored = score_file("paraphrase", theirs, data_dir)
    assert scored == {"accuracy": ran["accuracy"], "f1": ran["f1"], "n": 30}
    answers = evaluation.answer_tokens(labels)
    assert scored["accuracy"] == pytest.approx(metrics.accuracy_score(answers, tokens))
    assert scored["f1"] == pytest.approx(metrics.f1_score(answers, tokens, average="macro"))
    first_10 = score_file("paraphrase", tmp_path / "rigged-para-dev-limit10-output.csv", data_dir)
    assert first_10 == {"accuracy": ran_10["yes_no_accuracy"], "f1": ran_10["yes_no_f1"], "n": 10}


HEADER = "id \t Predicted_Is_Paraphrase \n"
BAD_PREDICTIONS = [  # (the file, what the one-line error must say); {id} is the first dev pair's
    ("", "p.csv:1: expected the course's header 'id <tab> Predicted_Is_Paraphrase'"),
    ("id,prediction\n{id}, 1 \n", "p.csv:1: expected the course's header"),
    (HEADER, "p.csv: has a header but no predictions"),
    (HEADER + "{id}, 1 \n{id} 0\n", r"p.csv:3: expected '<id>, <prediction>' \(a whole number\), got '.* 0'"),
    (HEADER + "{id}, yes \n", "p.csv:2: expected '<id>, <prediction>'"),
    (HEADER + "{id}, -1 \n", "p.csv:2: expected '<id>, <prediction>'"),
    (HEADER + ", 1 \n", "p.csv:2: id '' is not in .*quora-dev.csv"),
    (HEADER + "{id}, 1 \n\nno-such-id, 1 \n", "p.csv:4: id 'no-such-id' is not in .*quora-dev.csv"),
    (HEADER + "{id}, 1 \n{ID}, 0 \n", "p.csv:3: id '.*' appears a second time"),
]


@pytest.mark.parametrize("text, message", BAD_PREDICTIONS, ids=[m.split(": ")[1][:40] for _, m in BAD_PREDICTIONS])
def test_a_malformed_paraphrase_file_is_one_line_naming_the_line(text, message, data_dir, tmp_path, refuse_to_load):
    pair_id = read_quora(data_dir / "quora-dev.csv")[0].id
    (tmp_path / "p.csv").write_text(text.format(id=pair_id, ID=pair_id.upper()))
    with pytest.raises(SystemExit) as exit_info:
        score_file("paraphrase", tmp_path / "p.csv", data_dir)
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error
    assert re.search(message, error), error


def test_bad_predictions_runs_are_one_line(data_dir, tmp_path, refuse_to_load):
    cases = [  # (task, file, extra flags, what the one-line error must say)
        ("paraphrase", tmp_path / "missing.csv", [], "--predictions '.*missing.csv': no such file"),
        ("paraphrase", data_dir / "quora-dev.csv", ["--split", "test"], "--split test: has no references"),
        ("sonnet", data_dir / "quora-dev.csv", [], "quora-dev.csv: found no numbered sonnets"),
        ("sonnet", data_dir / "sonnets_held_out_dev.txt", ["--split", "train"], "--split train: --task sonnet has"),
    ]
    (tmp_path / "empty.txt").write_text("--Generated Sonnets-- \n\n\n0\nA line\n\n1\n")
    cases.append(("sonnet", tmp_path / "empty.txt", [], "empty.txt:7: sonnet 1 has no lines"))
    for task, path, extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            score_file(task, path, data_dir, *extra)
        assert re.fullmatch(f"error: .*{message}.*", str(exit_info.value.code)), exit_info.value.code
