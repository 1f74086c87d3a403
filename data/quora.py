"""
Quora paraphrase detection, framed as in the Stanford CS224N GPT-2 project: the model reads a cloze-style
prompt about two questions and answers with one token, "yes" (they ask the same thing) or "no".

File format (tab-separated, csv-style "" quoting, a header row):
    id  sentence1  sentence2  is_duplicate      train and dev; labels are 0.0 or 1.0
    id  sentence1  sentence2                    the course's test-student file: no labels
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from data.batching import Example
from data.tokenizer import encode
from fileio import InputError

YES_TOKEN = 8505  # encode("yes"): the answer for a paraphrase
NO_TOKEN = 3919  # encode("no")
LABELED_HEADER = ["id", "sentence1", "sentence2", "is_duplicate"]
UNLABELED_HEADER = ["id", "sentence1", "sentence2"]


@dataclass(frozen=True)
class QuoraPair:
    id: str
    sentence1: str
    sentence2: str
    label: int | None  # 1 = paraphrase, 0 = not, None = unlabeled (test-student)


def read_quora(path, limit=None):
    """Read a Quora file in the course's format; `limit` keeps only the first N pairs.

    Any malformed input (missing file, empty file, wrong header, wrong column count, a label other than
    0/1) raises InputError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; run `python -m data.download` or copy the course's "
                         f"Quora files into data/")
    pairs = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate the BOM some editors write
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None:
            raise InputError(f"{path}: the file is empty; expected a header line {' '.join(LABELED_HEADER)}")
        header = [h.strip() for h in header]
        if header not in (LABELED_HEADER, UNLABELED_HEADER):
            raise InputError(f"{path}:1: header is {header}, expected {LABELED_HEADER} "
                             f"(or {UNLABELED_HEADER} for unlabeled test data), tab-separated")
        for row in rows:
            if limit is not None and len(pairs) >= limit:
                break
            where = f"{path}:{rows.line_num}"
            if len(row) != len(header):
                raise InputError(f"{where}: expected {len(header)} tab-separated columns "
                                 f"({' '.join(header)}), found {len(row)}: {row!r}")
            label = None
            if len(header) == 4:
                label = {"0": 0, "0.0": 0, "1": 1, "1.0": 1}.get(row[3].strip())
                if label is None:
                    raise InputError(f"{where}: is_duplicate must be 0 or 1 (0.0 or 1.0), found {row[3]!r}")
            pairs.append(QuoraPair(row[0].strip(), row[1], row[2], label))
    return pairs


def preprocess_string(s):
    """The course's normalisation: lower-case, and split . ? , ' off the words."""
    return " ".join(s.lower().replace(".", " .").replace("?", " ?").replace(",", " ,").replace("'", " '").split())


def paraphrase_prompt(sentence1, sentence2):
    """The course's prompt, character for character (the second question's missing closing quote included)."""
    s1, s2 = preprocess_string(sentence1), preprocess_string(sentence2)
    return f'Question 1: "{s1}"\nQuestion 2: "{s2}\nAre these questions asking the same thing?\n'


def paraphrase_example(pair):
    """Prompt tokens, then the answer token as the only target (no target when the pair is unlabeled)."""
    target = [] if pair.label is None else [YES_TOKEN if pair.label == 1 else NO_TOKEN]
    return Example(prompt=encode(paraphrase_prompt(pair.sentence1, pair.sentence2)), target=target)
