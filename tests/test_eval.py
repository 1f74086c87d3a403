"""eval.py: the metrics against their definitions and sacrebleu, and both evaluations end to end."""

import random

import pytest
import torch

import eval as evaluation
from conftest import always_predict, tiny_config
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example, paraphrase_prompt, read_quora
from data.sonnets import read_sonnets
from data.tokenizer import encode
from model import GPT

# -----------------------------------------------------------------------------
# metrics


def test_accuracy_and_macro_f1_on_hand_made_predictions():
    predictions, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert evaluation.accuracy(predictions, labels) == 0.75
    # class 1: TP 2, FP 1, FN 0 -> F1 4/5; class 0: TP 1, FP 0, FN 1 -> F1 2/3
    assert evaluation.macro_f1(predictions, labels) == pytest.approx((4 / 5 + 2 / 3) / 2)
    # always "yes": class 0 is never predicted, so its F1 is 0 (sklearn's value too)
    assert evaluation.macro_f1([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx((0 + 2 / 3) / 2)
    assert evaluation.macro_f1([0, 1], [0, 1]) == 1.0
    with pytest.raises(ValueError, match="equally many"):
        evaluation.accuracy([1], [1, 0])


def sacrebleu_chrf(hypotheses, references):
    sacrebleu = pytest.importorskip("sacrebleu")
    return sacrebleu.metrics.CHRF().corpus_score(hypotheses, [references]).score


def check_chrf_against_sacrebleu(data_dir):
    """Our chrF and sacrebleu's on the dev sonnets of data_dir, for hypotheses from empty to perfect."""
    true = [s.text for s in read_sonnets(data_dir / "TRUE_sonnets_held_out_dev.txt")]
    prompts = [s.text for s in read_sonnets(data_dir / "sonnets_held_out_dev.txt")]
    train = [s.text for s in read_sonnets(data_dir / "sonnets.txt")]
    rng = random.Random(0)
    candidates = {
        "the prompts alone": prompts,
        "other sonnets": rng.sample(train, len(true)),
        "the truth itself": true,
        "prompt + another sonnet's lines": [p + "\n" + "\n".join(t.split("\n")[3:]) for p, t in zip(prompts, train)],
        "shuffled words": [" ".join(rng.sample(t.split(), len(t.split()))) for t in true],
        "with empty and tiny hypotheses": ["", "a", "Thine"] + prompts[3:],
    }
    for name, hypotheses in candidates.items():
        assert evaluation.chrf(hypotheses, true) == pytest.approx(sacrebleu_chrf(hypotheses, true), abs=1e-9), name


def test_chrf_equals_sacrebleu_on_the_sample_sonnets(sample_data):
    check_chrf_against_sacrebleu(sample_data)


def test_chrf_equals_sacrebleu_on_the_courses_sonnets(course_data):
    check_chrf_against_sacrebleu(course_data)


def test_chrf_edge_cases_equal_sacrebleu():
    for hypotheses, references in [(["abc"], ["abcdefgh"]), (["a b c d e f g"], ["abcdefg"]), (["xyz"], ["abc"]),
                                   (["short", "a much longer hypothesis here"], ["shore", "a longer reference"])]:
        assert evaluation.chrf(hypotheses, references) == pytest.approx(sacrebleu_chrf(hypotheses, references))
    assert evaluation.chrf(["same text"], ["same text"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        evaluation.chrf(["a"], ["a", "b"])


# -----------------------------------------------------------------------------
# paraphrase scoring


def answers_yes(model, pairs, **kwargs):
    return evaluation.answers_yes(model, [paraphrase_example(p).prompt for p in pairs], **kwargs)


def test_batched_scoring_equals_scoring_one_pair_at_a_time(sample_data, tiny_model):
    pairs = read_quora(sample_data / "quora-dev.csv")
    predictions = answers_yes(tiny_model, pairs, batch_size=7)
    for pair, prediction in zip(pairs, predictions):
        ids = torch.tensor([encode(paraphrase_prompt(pair.sentence1, pair.sentence2))])
        with torch.no_grad():
            logits = tiny_model(ids)[0, -1]  # full logits, the last prompt position
        assert prediction == int(logits[YES_TOKEN] > logits[NO_TOKEN])
    assert 0 < sum(predictions) < len(pairs)  # both answers occur, so a batch that mixed up rows would show


def test_paraphrase_evaluation_end_to_end(sample_data, tiny_model):
    pairs = read_quora(sample_data / "quora-dev.csv")
    always_predict(tiny_model, YES_TOKEN)  # a model that always says "yes"
    result = evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=8)
    assert [p.label for p in pairs].count(1) == 12  # the sample file: 12 paraphrases, 18 not
    assert result["predictions"] == [1] * 30
    assert result["accuracy"] == pytest.approx(12 / 30)
    # class 1: TP 12, FP 18, FN 0 -> F1 = 24 / 42; class 0 is never predicted: TP 0 -> F1 0
    assert result["f1"] == pytest.approx((24 / 42 + 0) / 2)
    with pytest.raises(ValueError, match="needs labelled pairs"):
        evaluation.evaluate_paraphrase(tiny_model, read_quora(sample_data / "quora-test-student.csv"))


# -----------------------------------------------------------------------------
# sonnets


def test_sonnet_evaluation_end_to_end(sample_data, tiny_model):
    held_out = read_sonnets(sample_data / "sonnets_held_out_dev.txt")
    true = read_sonnets(sample_data / "TRUE_sonnets_held_out_dev.txt")
    result = evaluation.evaluate_sonnets(tiny_model, held_out, true, max_new_tokens=12, batch_size=3)
    assert [n for n, _ in result["sonnets"]] == list(range(11, 15))
    for (_, text), prompt in zip(result["sonnets"], held_out):
        assert text.startswith(prompt.text) and len(text) > len(prompt.text)  # given lines kept, then new text
    texts = [t for _, t in result["sonnets"]]
    assert result["chrf"] == pytest.approx(sacrebleu_chrf(texts, [s.text for s in true]))
    again = evaluation.evaluate_sonnets(tiny_model, held_out, true, max_new_tokens=12, batch_size=3)
    assert again["sonnets"] == result["sonnets"]  # seeded


def test_sonnet_file_round_trips_through_the_course_parser(tmp_path):
    sonnets = [(132, "Line one,\nline two.\n  Indented couplet."), (133, "Another\nsonnet")]
    evaluation.write_sonnets(tmp_path / "s.txt", sonnets)
    assert [(s.number, s.text) for s in read_sonnets(tmp_path / "s.txt")] == sonnets


def test_paraphrase_predictions_file_is_the_course_format(tmp_path, sample_data):
    pairs = read_quora(sample_data / "quora-test-student.csv")[:2]
    evaluation.write_paraphrase_predictions(tmp_path / "p.csv", pairs, [1, 0])
    assert (tmp_path / "p.csv").read_text() == (
        f"id \t Predicted_Is_Paraphrase \n{pairs[0].id}, 1 \n{pairs[1].id}, 0 \n")


# -----------------------------------------------------------------------------
# scoring inside a training loop: the caller's train/eval mode comes back


def modes(model):
    return [m.training for m in model.modules()]


def test_scoring_and_generation_restore_the_callers_mode(sample_data):
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5))
    pairs = read_quora(sample_data / "quora-dev.csv")
    held_out = read_sonnets(sample_data / "sonnets_held_out_dev.txt")[:2]
    generate_sonnets = lambda **kw: evaluation.evaluate_sonnets(model, held_out, None, **kw)["sonnets"]  # noqa: E731
    expected = answers_yes(model.eval(), pairs)
    expected_sonnets = generate_sonnets(max_new_tokens=6)

    model.train()
    model.transformer.h[0].eval()  # a mixed state, e.g. a frozen part of the model
    before = modes(model)
    assert answers_yes(model, pairs) == expected  # dropout (p=0.5) was off while scoring
    assert modes(model) == before
    assert generate_sonnets(max_new_tokens=6) == expected_sonnets
    assert modes(model) == before
    with pytest.raises(ValueError, match="exceeds block_size"):  # a failed call restores the mode too
        generate_sonnets(max_new_tokens=500)
    assert modes(model) == before
    model.eval()
    answers_yes(model, pairs[:2])
    assert not any(modes(model))  # a model in eval mode stays in eval mode
