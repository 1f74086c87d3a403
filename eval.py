"""
The two tasks' scores, as the Stanford CS224N GPT-2 project defines them.

    python eval.py --task paraphrase --checkpoint gpt2 --split dev       # accuracy and macro-F1
    python eval.py --task sonnet --checkpoint out/my-model --split dev   # chrF of the generated sonnets

--checkpoint is a GPT-2 name (gpt2, gpt2-medium, ...) or a directory with config.json + model.safetensors
(what the training scripts write); --adapter adds a LoRA adapter on top. Predictions are written in the
course's submission formats under predictions/.

Paraphrase detection: the model reads the course's prompt and we compare its logits for "yes" and "no" at
the last prompt position: predict "paraphrase" when yes > no. Sonnets: the model continues the first 3
lines of each held-out sonnet (temperature 1.2, top-p 0.9, up to 128 new tokens, seeded), and the whole
sonnet, given lines included as in the course, is scored against the true sonnet with corpus chrF.
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from data.batching import Example, batch_indices, collate, left_pad
from data.quora import NO_TOKEN, YES_TOKEN, paraphrase_example, read_quora
from data.sonnets import read_sonnets
from data.tokenizer import decode, encode
from fileio import InputError, atomic_open
from model import END_OF_TEXT, default_device, load_model

# -----------------------------------------------------------------------------
# metrics: pure functions of Python lists


def check_predictions(predictions, labels):
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equally many predictions and labels, got {len(predictions)} and {len(labels)}")


def accuracy(predictions, labels):
    check_predictions(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions, labels):
    """F1 of each class, F1 = 2 TP / (2 TP + FP + FN), averaged over the classes that occur in labels or
    predictions (what sklearn's f1_score(average="macro") computes)."""
    check_predictions(predictions, labels)
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def char_ngrams(text, n):
    text = "".join(text.split())  # chrF ignores whitespace
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypotheses, references, max_order=6, beta=2.0):
    """Corpus chrF (Popović 2015), exactly as sacrebleu's CHRF().corpus_score computes it.

    For each order n = 1..6, count character n-grams (whitespace removed) over the whole corpus: those in
    the hypotheses, those in the references, and the matches (clipped to the reference count). Then
        P = mean over orders of matches / hypothesis n-grams,   R = mean over orders of matches / reference n-grams
        chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R)            (beta = 2: recall counts 4x)
    Orders with no hypothesis or no reference n-grams are left out of the means (sacrebleu's "effective order").
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"chrF needs one reference per hypothesis, got {len(hypotheses)} and {len(references)}")
    n_hyp, n_ref, n_match = [0] * max_order, [0] * max_order, [0] * max_order
    for hypothesis, reference in zip(hypotheses, references):
        for n in range(1, max_order + 1):
            hyp, ref = char_ngrams(hypothesis, n), char_ngrams(reference, n)
            n_hyp[n - 1] += sum(hyp.values()) if ref else 0  # sacrebleu: no reference n-grams, no hypothesis count
            n_ref[n - 1] += sum(ref.values())
            n_match[n - 1] += sum((hyp & ref).values())
    orders = [n for n in range(max_order) if n_hyp[n] > 0 and n_ref[n] > 0]
    if not orders:
        return 0.0
    precision = sum(n_match[n] / n_hyp[n] for n in orders) / len(orders)
    recall = sum(n_match[n] / n_ref[n] for n in orders) / len(orders)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)


# -----------------------------------------------------------------------------
# paraphrase detection


def predict_paraphrase(model, pairs, batch_size=64, device="cpu"):
    """1 (paraphrase) where the model's "yes" logit beats its "no" logit after the prompt, else 0."""
    return answers_yes(model, [paraphrase_example(p).prompt for p in pairs], batch_size, device)


@torch.no_grad()
def answers_yes(model, prompts, batch_size=64, device="cpu"):
    """For each prompt (token ids): 1 if logit("yes") > logit("no") at its last position, else 0."""
    model.eval()
    examples = [Example(prompt, []) for prompt in prompts]
    predictions = [0] * len(examples)
    for idx in tqdm(batch_indices([len(e) for e in examples], batch_size), desc="paraphrase", disable=None):
        batch = collate([examples[i] for i in idx]).to(device)
        # right padding needs no attention mask: causal attention never looks right, at the padding
        hidden = model.hidden_states(batch.input_ids)
        last = hidden[torch.arange(len(idx), device=device), batch.lengths - 1]  # (B, n_embd)
        logits = model.lm_head(last)
        says_yes = (logits[:, YES_TOKEN] > logits[:, NO_TOKEN]).tolist()
        for i, yes in zip(idx, says_yes):
            predictions[i] = int(yes)
    return predictions


def evaluate_paraphrase(model, pairs, batch_size=64, device="cpu"):
    labels = [p.label for p in pairs]
    if None in labels:
        raise ValueError("evaluate_paraphrase needs labelled pairs; use predict_paraphrase for test-student data")
    predictions = predict_paraphrase(model, pairs, batch_size, device)
    return {"accuracy": accuracy(predictions, labels), "f1": macro_f1(predictions, labels), "predictions": predictions}


def write_paraphrase_predictions(path, pairs, predictions):
    """The course's submission format: a header, then "id, prediction" per line."""
    with atomic_open(path) as f:
        f.write("id \t Predicted_Is_Paraphrase \n")
        for pair, prediction in zip(pairs, predictions):
            f.write(f"{pair.id}, {prediction} \n")


# -----------------------------------------------------------------------------
# sonnet generation


@torch.no_grad()
def generate_sonnets(model, prompts, temperature=1.2, top_p=0.9, max_new_tokens=128, seed=11711, batch_size=16,
                     device="cpu"):
    """Each prompt followed by the model's continuation (up to its end-of-text token), as text."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    sonnets = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sonnets", disable=None):
        prompt_ids = [encode(p) for p in prompts[start:start + batch_size]]
        input_ids, attention_mask = left_pad(prompt_ids)
        out = model.generate(input_ids.to(device), max_new_tokens, temperature=temperature, top_p=top_p,
                             attention_mask=attention_mask.to(device), generator=generator)
        for ids, row in zip(prompt_ids, out.tolist()):
            new = row[input_ids.size(1):]
            if END_OF_TEXT in new:
                new = new[:new.index(END_OF_TEXT)]
            sonnets.append(decode(ids + new).strip())
    return sonnets


def evaluate_sonnets(model, held_out, references, device="cpu", **generation):
    """Generate from each held-out sonnet's first lines; chrF against the true sonnets of the same numbers."""
    by_number = {s.number: s.text for s in references}
    missing = [s.number for s in held_out if s.number not in by_number]
    if missing:
        raise InputError(f"no reference sonnet for held-out sonnet(s) {missing}")
    sonnets = generate_sonnets(model, [s.text for s in held_out], device=device, **generation)
    return {"chrf": chrf(sonnets, [by_number[s.number] for s in held_out]),
            "sonnets": list(zip([s.number for s in held_out], sonnets))}


def write_sonnets(path, numbered_sonnets):
    """The course's format: a title line, then each sonnet's number on its own line and its text."""
    with atomic_open(path) as f:
        f.write("--Generated Sonnets-- \n\n")
        for number, text in numbered_sonnets:
            f.write(f"\n{number}\n{text}\n\n")


# -----------------------------------------------------------------------------
# command line

QUORA_SPLITS = {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}
SONNET_SPLITS = {"dev": ("sonnets_held_out_dev.txt", "TRUE_sonnets_held_out_dev.txt"),
                "test": ("sonnets_held_out.txt", None)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score a GPT-2 checkpoint on paraphrase detection or sonnets.")
    parser.add_argument("--task", choices=["paraphrase", "sonnet"], required=True)
    parser.add_argument("--checkpoint", default="gpt2", help="gpt2, gpt2-medium, ... or a model directory")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter (.safetensors) to apply on top")
    parser.add_argument("--split", choices=["train", "dev", "test"], default="dev")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--seed", type=int, default=11711)
    parser.add_argument("--temperature", type=float, default=1.2)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=Path("predictions"))
    args = parser.parse_args(argv)
    try:
        run(args)
    except InputError as e:
        sys.exit(f"error: {e}")


def run(args):
    t0 = time.time()
    # read the data first: a missing file should fail before a model is downloaded or loaded
    if args.task == "paraphrase":
        pairs = read_quora(args.data_dir / QUORA_SPLITS[args.split], limit=args.limit)
    else:
        if args.split not in SONNET_SPLITS:
            raise InputError("--task sonnet has a dev and a test split (sonnets.txt is for training)")
        prompts_file, references_file = SONNET_SPLITS[args.split]
        held_out = read_sonnets(args.data_dir / prompts_file, limit=args.limit)
        references = read_sonnets(args.data_dir / references_file) if references_file else None
    model = load_model(args.checkpoint, args.adapter).to(args.device).eval()
    name = Path(args.checkpoint).name + (f"+{Path(args.adapter).stem}" if args.adapter else "")
    print(f"{args.checkpoint}: {model.num_parameters() / 1e6:.1f}M parameters on {args.device}")

    t1 = time.time()
    if args.task == "paraphrase":
        if pairs and pairs[0].label is not None:
            result = evaluate_paraphrase(model, pairs, args.batch_size, args.device)
            predictions = result["predictions"]
            score = f"accuracy {result['accuracy']:.4f}  macro-F1 {result['f1']:.4f}"
        else:
            predictions, score = predict_paraphrase(model, pairs, args.batch_size, args.device), "(no labels)"
        out = args.out_dir / f"{name}-para-{args.split}-output.csv"
        write_paraphrase_predictions(out, pairs, predictions)
        what = f"{len(pairs)} pairs"
    else:
        generation = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, batch_size=args.batch_size)
        if references is not None:
            result = evaluate_sonnets(model, held_out, references, device=args.device, **generation)
            numbered, score = result["sonnets"], f"chrF {result['chrf']:.2f}"
        else:
            texts = generate_sonnets(model, [s.text for s in held_out], device=args.device, **generation)
            numbered, score = list(zip([s.number for s in held_out], texts)), "(no references)"
        out = args.out_dir / f"{name}-sonnets-{args.split}.txt"
        write_sonnets(out, numbered)
        what = f"{len(held_out)} sonnets"
    print(f"{args.task} {args.split}: {score}  ({what}, {time.time() - t1:.1f}s scoring, "
          f"{time.time() - t0:.1f}s total)")
    print(f"predictions: {out}")


if __name__ == "__main__":
    main()
