"""
The two tasks' scores as the Stanford CS224N GPT-2 project defines them, of a model or of a submission file.

    python eval.py --task paraphrase --checkpoint gpt2                    # accuracy and macro-F1 on the dev pairs
    python eval.py --task sonnet --checkpoint out/my-model --split test   # the test sonnets, written for submission
    python eval.py --task sonnet --predictions generated_sonnets.txt      # chrF of a submission file, no model
"""

import sys
import time
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

import flags
from checkpoint import check_source, load_model, model_context
from data.batching import Example, batch_indices, collate, left_pad
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example, read_quora
from data.sonnets import read_sonnets
from data.tasks import QUORA, SONNETS
from data.tokenizer import END_OF_TEXT, decode, encode
from fileio import InputError, atomic_open, read_text, writable_dir
from flags import LIMIT, REQUIRED, at_least, check_device, default_device, one_of

# -----------------------------------------------------------------------------
# metrics: pure functions of Python lists


def check_predictions(predictions, labels):
    if len(predictions) != len(labels) or len(labels) == 0:
        raise ValueError(f"need equally many predictions and labels, got {len(predictions)} and {len(labels)}")


def accuracy(predictions, labels):
    check_predictions(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions, labels):
    """The mean over every class c in labels or predictions (0/1, or token ids) of
        F1_c = 2 TP / (2 TP + FP + FN) = 2 TP / (times c is predicted + times c is the label)
    as sklearn's f1_score(labels, predictions, average="macro"): a class never predicted, or only predicted (a
    third token), has F1 = 0 and counts in the mean."""
    check_predictions(predictions, labels)
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(p == c == y for p, y in zip(predictions, labels))
        scores.append(2 * tp / (predictions.count(c) + labels.count(c)))
    return sum(scores) / len(scores)


@lru_cache(maxsize=4096)  # a bootstrap (stats.py) rescores the same few sonnets thousands of times
def chrf_counts(hypothesis, reference, max_order=6):
    """Per order n = 1..max_order: (hypothesis n-grams, reference n-grams, matches clipped to the reference)."""
    texts = ["".join(text.split()) for text in (hypothesis, reference)]  # chrF ignores whitespace
    counts = []
    for n in range(1, max_order + 1):
        hyp, ref = (Counter(text[i:i + n] for i in range(len(text) - n + 1)) for text in texts)
        n_hyp = sum(hyp.values()) if ref else 0  # sacrebleu: no reference n-grams, no hypothesis count
        counts.append((n_hyp, sum(ref.values()), sum((hyp & ref).values())))
    return tuple(counts)


def chrf(hypotheses, references, max_order=6, beta=2.0):
    """Corpus chrF (Popović 2015), as sacrebleu's CHRF().corpus_score: character n-grams (whitespace removed) of
    each order n = 1..6 counted over the whole corpus, then
        P = mean over orders of matches / hypothesis n-grams,   R = mean over orders of matches / reference n-grams
        chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R)            (beta = 2: recall counts 4x)
    Orders with no hypothesis or no reference n-grams are left out of the means (sacrebleu's "effective order").
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"chrF needs one reference per hypothesis, got {len(hypotheses)} and {len(references)}")
    counts = [chrf_counts(h, r, max_order) for h, r in zip(hypotheses, references)]
    totals = [[sum(column) for column in zip(*order)] for order in zip(*counts)]  # per order: hyp, ref, matches
    orders = [(h, r, m) for h, r, m in totals if h > 0 and r > 0]
    if not orders:
        return 0.0
    precision = sum(m / h for h, _, m in orders) / len(orders)
    recall = sum(m / r for _, r, m in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)


# -----------------------------------------------------------------------------
# the model in eval mode: paraphrase answers, sonnets


@contextmanager
def eval_mode(model):
    """model.eval() (dropout off) inside the block; afterwards every module is back in the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def paraphrase_answers(model, prompts, batch_size=64, device="cpu"):
    """One forward pass per batch of prompts (token ids); from the logits at each one's last position:
        tokens: argmax over the whole vocabulary     (the course's prediction; may be neither "yes" nor "no")
        yes:    1 if logit("yes") > logit("no") else 0           (the restricted prediction)
    Returns (tokens, yes), two lists in the order of the prompts."""
    examples = [Example(prompt, []) for prompt in prompts]
    tokens, yes = [0] * len(examples), [0] * len(examples)
    with eval_mode(model):
        for idx in tqdm(batch_indices([len(e) for e in examples], batch_size), desc="paraphrase", disable=None):
            batch = collate([examples[i] for i in idx]).to(device)
            # right padding needs no attention mask: causal attention never looks right, at the padding
            hidden = model.hidden_states(batch.input_ids)
            last = hidden[torch.arange(len(idx), device=device), batch.lengths - 1]  # (B, n_embd)
            logits = model.lm_head(last)  # (B, vocab), computed once for both answers
            says_yes = (logits[:, YES_TOKEN] > logits[:, NO_TOKEN]).tolist()
            for i, token, answer in zip(idx, logits.argmax(dim=-1).tolist(), says_yes):
                tokens[i], yes[i] = token, int(answer)
    return tokens, yes


def answers_yes(model, prompts, batch_size=64, device="cpu"):
    """paraphrase_answers' restricted 0/1 answers alone."""
    return paraphrase_answers(model, prompts, batch_size, device)[1]


def answer_tokens(labels):
    """The answer token of each 0/1 label, the course's y_true: 1 -> "yes", 0 -> "no"."""
    return [YES_TOKEN if y == 1 else NO_TOKEN for y in labels]


def evaluate_paraphrase(model, pairs, batch_size=64, device="cpu"):
    """Labelled pairs scored as the course does (its model_eval_paraphrase: sklearn's accuracy and macro-F1 of
    the argmax token against the answer token), and by the restricted answers:
        accuracy, f1                    the course's: argmax token vs answer token (a third token is wrong)
        yes_no_accuracy, yes_no_f1      the restricted 0/1 answers vs the labels
        yes_no_share                    the fraction of argmax tokens that are "yes" or "no"
        predictions, predicted_tokens   the restricted answers (what the predictions file holds), the argmax tokens
    """
    labels = [p.label for p in pairs]
    if None in labels:
        raise ValueError("evaluate_paraphrase needs labelled pairs; use answers_yes for test-student data")
    tokens, predictions = paraphrase_answers(model, [paraphrase_example(p).prompt for p in pairs], batch_size, device)
    answers = answer_tokens(labels)
    return {"accuracy": accuracy(tokens, answers), "f1": macro_f1(tokens, answers),
            "yes_no_accuracy": accuracy(predictions, labels), "yes_no_f1": macro_f1(predictions, labels),
            "yes_no_share": sum(t in (YES_TOKEN, NO_TOKEN) for t in tokens) / len(tokens),
            "predictions": predictions, "predicted_tokens": tokens}


@torch.no_grad()
def sample_continuations(model, prompts, temperature=1.2, top_p=0.9, max_new_tokens=128, seed=11711, batch_size=16,
                         device="cpu"):
    """What the model writes after each prompt (lists of token ids), as sampled: up to and including its
    end-of-text token when it wrote one within max_new_tokens, else the max_new_tokens it wrote."""
    generator = torch.Generator(device=device).manual_seed(seed)
    continuations = []
    with eval_mode(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=None):
            input_ids, attention_mask = left_pad(prompts[start:start + batch_size])
            out = model.generate(input_ids.to(device), max_new_tokens, temperature=temperature, top_p=top_p,
                                 attention_mask=attention_mask.to(device), generator=generator)
            for row in out[:, input_ids.size(1):].tolist():
                continuations.append(row[:row.index(END_OF_TEXT) + 1] if END_OF_TEXT in row else row)
    return continuations


def evaluate_sonnets(model, held_out, references, device="cpu", **generation):
    """The model continues each held-out sonnet's first lines (`generation`: sample_continuations' settings):
    "sonnets", (number, the whole text); with references (None for the test split), "chrf" against the true
    sonnets of the same numbers."""
    true = None if references is None else {s.number: s.text for s in references}
    if true is not None and (missing := [s.number for s in held_out if s.number not in true]):
        raise InputError(f"no reference sonnet for held-out sonnet(s) {missing}")
    prompts = [encode(s.text) for s in held_out]
    new = sample_continuations(model, prompts, device=device, **generation)
    texts = [decode(ids + [t for t in tokens if t != END_OF_TEXT]).strip() for ids, tokens in zip(prompts, new)]
    result = {"sonnets": list(zip([s.number for s in held_out], texts))}
    if true is None:
        return result
    return {"chrf": chrf(texts, [true[s.number] for s in held_out]), **result}


# -----------------------------------------------------------------------------
# submission files in the course's formats: written from a model's predictions, or scored with no model


def write_paraphrase_predictions(path, pairs, predictions):
    """A header, then "id, prediction" per line (the restricted 0/1 answers: right wherever the argmax is)."""
    with atomic_open(path) as f:
        f.write("id \t Predicted_Is_Paraphrase \n")
        for pair, prediction in zip(pairs, predictions):
            f.write(f"{pair.id}, {prediction} \n")


def write_sonnets(path, numbered_sonnets):
    """A title line, then each sonnet's number on its own line and its text."""
    with atomic_open(path) as f:
        f.write("--Generated Sonnets-- \n\n")
        for number, text in numbered_sonnets:
            f.write(f"\n{number}\n{text}\n\n")


def score_paraphrase_file(path, reference):
    """Accuracy and macro-F1 of a predictions file against the labelled pairs in `reference`, as the course
    scores it: tokens against answer tokens. A file of 0/1 answers only (this project's) is read as "no"/"yes",
    else as token ids (the course's starter's). Ids match in lower case, as the course reads them; only the pairs
    the file answers are scored (a --limit run's)."""
    labels = {pair.id.lower(): pair.label for pair in read_quora(reference)}
    if None in labels.values():
        raise InputError(f"{reference}: has no is_duplicate column to score --predictions against")
    lines = read_text(path).splitlines()
    if not lines or lines[0].split() != ["id", "Predicted_Is_Paraphrase"]:
        raise InputError(f"{path}:1: expected the course's header 'id <tab> Predicted_Is_Paraphrase'")
    found = {}  # id -> prediction, in the file's order
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # a blank line, such as an editor's at the end
        pair_id, _, value = line.rpartition(",")
        pair_id, value = pair_id.strip().lower(), value.strip()
        if not (value.isascii() and value.isdigit()):
            raise InputError(f"{path}:{number}: expected '<id>, <prediction>' (a whole number), got {line!r}")
        if pair_id not in labels:
            raise InputError(f"{path}:{number}: id {pair_id!r} is not in {reference}")
        if pair_id in found:
            raise InputError(f"{path}:{number}: id {pair_id!r} appears a second time")
        found[pair_id] = int(value)
    if not found:
        raise InputError(f"{path}: has a header but no predictions")
    predictions = list(found.values())
    if set(predictions) <= {0, 1}:
        predictions = answer_tokens(predictions)
    answers = answer_tokens([labels[pair_id] for pair_id in found])
    return {"accuracy": accuracy(predictions, answers), "f1": macro_f1(predictions, answers), "n": len(found)}


# -----------------------------------------------------------------------------
# the command line: a row per flag, then the checks that span flags or read files, before any real work

SONNET_TAGS = {"seed": "seed", "temperature": "temp", "top_p": "topp", "max_new_tokens": "tokens",
               "batch_size": "batch"}  # the file name's tag of each sampling setting

SETTINGS = {
    "task": (REQUIRED, str, one_of("paraphrase", "sonnet"), "paraphrase (accuracy, macro-F1) or sonnet (chrF)"),
    "checkpoint": ("gpt2", str, None, "a GPT-2 name (gpt2 ... gpt2-xl), a model directory or a run folder"),
    "adapter": (None, str, None, "a LoRA adapter (.safetensors written by lora.save_lora) to apply on top"),
    "predictions": (None, str, None, "score this course-format file against --split's references, with no model"),
    "split": ("dev", str, one_of("train", "dev", "test"), "the sonnets have dev and test"),
    "data_dir": (Path(__file__).resolve().parent / "data", Path, None, "where the course's files are"),
    "limit": (None, int, LIMIT, "score only the first N examples"),
    "batch_size": (64, int, at_least(1), "prompts per forward pass"),
    "device": (default_device(), str, None, "cpu, cuda, cuda:N or mps (the default is the best one here)"),
    "seed": (11711, int, (lambda v: 0 <= v < 2 ** 64, "must be in [0, 2**64)"), "sonnet sampling seed"),
    "temperature": (1.2, float, (lambda v: v >= 0, "must be >= 0 (0 picks the most likely token)"), "the course's"),
    "top_p": (0.9, float, (lambda v: 0 < v <= 1, "must be in (0, 1]"), "nucleus sampling (the course's)"),
    "max_new_tokens": (128, int, at_least(1), "sonnet tokens written after each prompt (the course's)"),
    "out_dir": (Path("predictions"), Path, None, "where the predictions file goes (named by prediction_file)"),
}


def check_config(config):
    """The checks that span several flags or look at files (each flag's own are flags.parse's)."""
    if config["task"] == "sonnet" and config["split"] == "train":
        raise InputError(f"--split {config['split']}: --task sonnet has a dev and a test split (sonnets.txt is for "
                         f"training)")
    if config["predictions"] is not None:
        if not Path(config["predictions"]).is_file():
            raise InputError(f"--predictions {config['predictions']!r}: no such file")
        if config["split"] == "test":
            raise InputError(f"--split test: has no references to score --predictions {config['predictions']} against")
        return
    check_device(config["device"])
    check_source(config["checkpoint"], "--checkpoint")
    if config["task"] == "sonnet" and config["max_new_tokens"] >= (context := model_context(config["checkpoint"])):
        raise InputError(f"--max_new_tokens {config['max_new_tokens']}: the model ({config['checkpoint']}) has "
                         f"{context} positions for the prompt and the new tokens together; give at most {context - 1}")
    if config["adapter"] is not None and not Path(config["adapter"]).is_file():
        raise InputError(f"--adapter {config['adapter']!r}: no such file (a .safetensors written by lora.save_lora)")
    writable_dir(config["out_dir"], "--out_dir")


def prediction_file(config):
    """The course's names, <model>-para-<split>-output.csv and <model>-sonnets-<split>.txt, with a tag for every
    setting that changes the predictions (-limitN; for sonnets SONNET_TAGS where not the default), so that two
    runs never overwrite each other. <model>: the checkpoint's last path component (+<adapter file stem>)."""
    checkpoint = Path(config["checkpoint"])
    name = (checkpoint.resolve() if checkpoint.is_dir() else checkpoint).name
    name += f"+{Path(config['adapter']).stem}" if config["adapter"] else ""
    tags = [f"limit{config['limit']}"] if config["limit"] is not None else []
    if config["task"] == "paraphrase":
        return config["out_dir"] / ("-".join([name, "para", config["split"], *tags, "output"]) + ".csv")
    tags += [f"{tag}{config[name]}" for name, tag in SONNET_TAGS.items() if config[name] != SETTINGS[name][0]]
    return config["out_dir"] / ("-".join([name, "sonnets", config["split"], *tags]) + ".txt")


def check_lengths(examples, block_size, what="training example"):
    longest = max(range(len(examples)), key=lambda i: len(examples[i]))
    if len(examples[longest]) > block_size:
        raise InputError(f"{what} {longest + 1} is {len(examples[longest])} tokens long, more than the "
                         f"model's block_size of {block_size} positions")


def check_prompts(task, prompts, path, context, max_new_tokens):
    """Every prompt must fit the model's `context` positions: a sonnet's with the max_new_tokens written after
    it, a labelled pair's (train, dev) alone. The test file's pairs, which all need a prediction, keep their
    last `context` tokens instead, with one warning."""
    sonnet = task == "sonnet"
    lengths = [len(encode(p.text) if sonnet else paraphrase_example(p).prompt) for p in prompts]
    too_long = [i for i, n in enumerate(lengths) if n > (context - max_new_tokens if sonnet else context)]
    if not too_long:
        return
    row, first, n = too_long[0] + 1, prompts[too_long[0]], lengths[too_long[0]]
    if sonnet:
        raise InputError(f"{path}: sonnet {first.number}'s prompt is {n} tokens; with --max_new_tokens "
                         f"{max_new_tokens} that makes {n + max_new_tokens}, more than the model's {context} "
                         f"positions; give --max_new_tokens at most {context - n}")
    if first.label is not None:
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise InputError(f"{path}: pair {row} (id {first.id}) makes a prompt of {n} tokens, more than the model's "
                         f"{context} positions{more}; shorten its questions or remove it")
    print(f"warning: {path}: {len(too_long)} of {len(prompts)} prompts are longer than the model's {context} "
          f"positions (the first: pair {row}, id {first.id}, {n} tokens); each keeps its last {context} tokens, "
          f"the start of question 1 is cut", file=sys.stderr)


def check_task_lengths(config, examples, dev):
    """The training examples and the dev prompts must fit the model's positions: read from its config alone, so
    that this fails before any weights are loaded."""
    context = model_context(config["init_from"])
    check_lengths(examples, context)
    paraphrase = config["task"] == "paraphrase"
    path = Path(config["data_dir"]) / (QUORA["dev"] if paraphrase else SONNETS["dev"])
    check_prompts(config["task"], dev if paraphrase else dev[0], path, context, config["max_new_tokens"])


def main(argv=None):
    return flags.main(run, SETTINGS, __doc__, argv)


def run(config):
    """Score a --predictions file against --split's references; or read --split, check its prompts against the
    model's positions (from its config alone), then load the model, score it and write its predictions."""
    check_config(config)
    t0, task, split, data_dir = time.time(), config["task"], config["split"], config["data_dir"]
    paraphrase, unit = task == "paraphrase", "pairs" if task == "paraphrase" else "sonnets"
    if config["predictions"] is not None:
        path = config["predictions"]
        reference = data_dir / (QUORA[split] if paraphrase else SONNETS["dev_true"])
        if paraphrase:
            result = score_paraphrase_file(path, reference)
            score = f"accuracy {result['accuracy']:.4f}  macro-F1 {result['f1']:.4f} (the course's)"
        else:  # the i-th sonnet against the i-th, as many as the shorter file holds: the course's test_sonnet
            sonnets, references = read_sonnets(path), read_sonnets(reference)
            n = min(len(sonnets), len(references))
            result = {"chrf": chrf([s.text for s in sonnets[:n]], [s.text for s in references[:n]]), "n": n}
            score = f"chrF {result['chrf']:.2f}"
        print(f"{task} {split}: {score}  ({result['n']} {unit} of {path}, against {reference})")
        return result
    data_file = data_dir / (QUORA if paraphrase else SONNETS)[split]
    data = (read_quora if paraphrase else read_sonnets)(data_file, limit=config["limit"])
    references = None if paraphrase or split == "test" else read_sonnets(data_dir / SONNETS["dev_true"])
    context = model_context(config["checkpoint"])
    check_prompts(task, data, data_file, context, config["max_new_tokens"])
    model = load_model(config["checkpoint"], config["adapter"]).to(config["device"])
    print(f"{config['checkpoint']}: {model.num_parameters() / 1e6:.1f}M parameters on {config['device']}")
    out = prediction_file(config)
    if paraphrase:
        if data[0].label is None:  # the test file: a prompt too long keeps its end
            prompts = [paraphrase_example(p).prompt[-context:] for p in data]
            result = {"predictions": answers_yes(model, prompts, config["batch_size"], config["device"])}
            score = "(no labels)"
        else:
            result = evaluate_paraphrase(model, data, config["batch_size"], config["device"])
            score = (f"accuracy {result['accuracy']:.4f}  macro-F1 {result['f1']:.4f} (the course's: argmax over the "
                     f"vocabulary)  yes/no accuracy {result['yes_no_accuracy']:.4f}  macro-F1 "
                     f"{result['yes_no_f1']:.4f}  yes/no share {result['yes_no_share']:.4f}")
        write_paraphrase_predictions(out, data, result["predictions"])
    else:
        generation = {name: config[name] for name in ("temperature", "top_p", "max_new_tokens", "seed", "batch_size")}
        result = evaluate_sonnets(model, data, references, config["device"], **generation)
        write_sonnets(out, result["sonnets"])
        score = f"chrF {result['chrf']:.2f}" if references else "(no references)"
    print(f"{task} {split}: {score}  ({len(data)} {unit}, {time.time() - t0:.1f}s)")
    print(f"predictions: {out}")
    return result


if __name__ == "__main__":
    main()
