"""Paraphrase accuracy and macro-F1 as the course computes them: the argmax over the whole vocabulary against
the answer token, scored with sklearn's accuracy_score and f1_score(average="macro"); a third token is wrong."""

from collections import Counter

import pytest
import torch

import eval as evaluation
from conftest import always_predict
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_prompt, read_quora
from data.tokenizer import encode

metrics = pytest.importorskip("sklearn.metrics")

THIRD = 11  # ",": a token that is neither "yes" nor "no"


def dev_pairs(sample_data):
    return read_quora(sample_data / "quora-dev.csv")  # 12 paraphrases, 18 not


# -----------------------------------------------------------------------------
# the metrics against sklearn


@pytest.mark.parametrize("labels, predictions", [
    # a third predicted token: it is wrong, and it is a class of its own in the macro average
    ([YES_TOKEN, NO_TOKEN, NO_TOKEN, YES_TOKEN, NO_TOKEN], [YES_TOKEN, THIRD, NO_TOKEN, THIRD, NO_TOKEN]),
    # every prediction a third token: every class has F1 0
    ([YES_TOKEN, NO_TOKEN, NO_TOKEN], [THIRD, THIRD, THIRD]),
    # "no" occurs in the labels but is never predicted (sklearn's 0/0 precision for it)
    ([YES_TOKEN, NO_TOKEN, NO_TOKEN, YES_TOKEN], [YES_TOKEN, YES_TOKEN, YES_TOKEN, YES_TOKEN]),
    # "yes" is predicted but never a label (a 0/0 recall), plus a third token
    ([NO_TOKEN, NO_TOKEN, NO_TOKEN], [YES_TOKEN, NO_TOKEN, THIRD]),
    # all correct, with one class only and with both
    ([NO_TOKEN, NO_TOKEN], [NO_TOKEN, NO_TOKEN]),
    ([YES_TOKEN, NO_TOKEN, YES_TOKEN], [YES_TOKEN, NO_TOKEN, YES_TOKEN]),
    # the restricted 0/1 labels keep working
    ([0, 1, 0, 1, 1], [1, 1, 0, 0, 1]),
])
def test_accuracy_and_macro_f1_equal_sklearn(labels, predictions):
    assert evaluation.accuracy(predictions, labels) == pytest.approx(metrics.accuracy_score(labels, predictions))
    ours = evaluation.macro_f1(predictions, labels)
    assert ours == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))  # the course's call
    for zero_division in (0.0, 1.0):  # no class in the average has 2 TP + FP + FN = 0, so this never matters
        assert ours == pytest.approx(metrics.f1_score(labels, predictions, average="macro", zero_division=zero_division))


def test_macro_f1_counts_a_third_token_as_a_class():
    labels = [YES_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]
    predictions = [YES_TOKEN, NO_TOKEN, THIRD, THIRD]
    # yes: TP 1 -> F1 1; no: TP 1, FN 2 -> 2/4; the third token: TP 0, FP 2 -> 0; mean over three classes
    assert evaluation.macro_f1(predictions, labels) == pytest.approx((1 + 2 / 4 + 0) / 3)
    assert evaluation.accuracy(predictions, labels) == pytest.approx(2 / 4)


def test_macro_f1_equals_sklearn_on_random_token_predictions():
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.tensor([YES_TOKEN, NO_TOKEN, THIRD, 198])
    for n in (1, 2, 7, 40):
        labels = vocabulary[torch.randint(0, 2, (n,), generator=generator)].tolist()
        predictions = vocabulary[torch.randint(0, 4, (n,), generator=generator)].tolist()
        assert evaluation.macro_f1(predictions, labels) == pytest.approx(
            metrics.f1_score(labels, predictions, average="macro"))


# -----------------------------------------------------------------------------
# evaluate_paraphrase on models


def test_a_model_that_answers_a_third_token_scores_zero(sample_data, tiny_model):
    pairs = dev_pairs(sample_data)
    always_predict(tiny_model, THIRD)  # every final hidden state is all ones: logit(t) = sum of t's output row
    with torch.no_grad():
        tiny_model.lm_head.weight[NO_TOKEN] = 0.5  # logit("no") = 32 < logit(THIRD) = 64, still far above "yes"
    result = evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=8)
    assert result["predicted_tokens"] == [THIRD] * 30
    assert result["accuracy"] == 0.0 and result["f1"] == 0.0  # yes, no and the third token: F1 0 each
    assert result["yes_no_share"] == 0.0
    # the yes-no margin says "no" for every pair: right on the 18 that are not paraphrases
    assert result["predictions"] == [0] * 30
    assert result["yes_no_accuracy"] == pytest.approx(18 / 30)
    # class 0: TP 18, FP 12 -> 2 * 18 / (2 * 18 + 12) = 36 / 48; class 1: never predicted -> 0
    assert result["yes_no_f1"] == pytest.approx((36 / 48 + 0) / 2)

    with torch.no_grad():
        tiny_model.lm_head.weight[YES_TOKEN] = 0.75  # now "yes" beats "no" (48 > 32), THIRD still wins (64)
    result = evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=8)
    assert result["accuracy"] == 0.0 and result["yes_no_share"] == 0.0
    assert result["predictions"] == [1] * 30 and result["yes_no_accuracy"] == pytest.approx(12 / 30)


def test_a_model_that_answers_yes_is_scored_the_same_both_ways(sample_data, tiny_model):
    pairs = dev_pairs(sample_data)
    always_predict(tiny_model, YES_TOKEN)
    result = evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=8)
    assert result["yes_no_share"] == 1.0
    assert result["accuracy"] == result["yes_no_accuracy"] == pytest.approx(12 / 30)
    assert result["f1"] == pytest.approx(result["yes_no_f1"])


def rig_three_answers(model):
    """Random output rows for "yes", "no" and THIRD, so the argmax varies between them (and others) by prompt."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for token in (YES_TOKEN, NO_TOKEN, THIRD):
            model.lm_head.weight[token] = torch.randn(model.config.n_embd, generator=generator)
    return model


def test_evaluation_equals_one_pair_at_a_time_and_sklearn(sample_data, tiny_model):
    pairs = dev_pairs(sample_data)
    rig_three_answers(tiny_model)
    result = evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=7)
    tokens, yes = [], []
    for pair in pairs:  # the reference: the full forward pass, one unpadded prompt at a time
        with torch.no_grad():
            logits = tiny_model(torch.tensor([encode(paraphrase_prompt(pair.sentence1, pair.sentence2))]))[0, -1]
        tokens.append(int(logits.argmax()))
        yes.append(int(logits[YES_TOKEN] > logits[NO_TOKEN]))
    assert result["predicted_tokens"] == tokens and result["predictions"] == yes
    counts = Counter(tokens)
    assert counts[YES_TOKEN] and counts[NO_TOKEN] and sum(counts.values()) > counts[YES_TOKEN] + counts[NO_TOKEN]
    labels = [p.label for p in pairs]
    answers = [encode("yes" if y == 1 else "no")[0] for y in labels]  # as the course's collate_fn tokenizes them
    assert evaluation.answer_tokens(labels) == answers
    assert result["accuracy"] == pytest.approx(metrics.accuracy_score(answers, tokens))
    assert result["f1"] == pytest.approx(metrics.f1_score(answers, tokens, average="macro"))
    assert result["yes_no_accuracy"] == pytest.approx(metrics.accuracy_score(labels, yes))
    assert result["yes_no_f1"] == pytest.approx(metrics.f1_score(labels, yes, average="macro"))
    assert result["yes_no_share"] == pytest.approx((counts[YES_TOKEN] + counts[NO_TOKEN]) / len(pairs))
    assert result["accuracy"] < result["yes_no_accuracy"]  # the third tokens cost the course's figure
    prompts = [encode(paraphrase_prompt(p.sentence1, p.sentence2)) for p in pairs]
    assert evaluation.answers_yes(tiny_model, prompts, batch_size=5) == yes  # the predictions file's answers


def test_one_forward_pass_per_batch_gives_both_answers(sample_data, tiny_model):
    pairs = dev_pairs(sample_data)
    calls = []
    forward = tiny_model.hidden_states
    tiny_model.hidden_states = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    evaluation.evaluate_paraphrase(tiny_model, pairs, batch_size=8)
    assert len(calls) == 4  # 30 pairs in batches of 8
