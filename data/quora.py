"""
Quora paraphrase detection, framed as in the Stanford CS224N GPT-2 project: the model reads a cloze-style
prompt about two questions and answers with one token, "yes" (they ask the same thing) or "no".

File format (tab-separated, csv-style "" quoting, a header row):
    id  sentence1  sentence2  is_duplicate      train and dev; labels are 0.0 or 1.0
    id  sentence1  sentence2                    the course's test-student file: no labels
"""

import csv
import io
import sys
from dataclasses import dataclass

from data import read_course_file
from data.batching import Example
from data.tokenizer import encode
from fileio import InputError

YES_TOKEN = 8505  # encode("yes"): the answer for a paraphrase
NO_TOKEN = 3919  # encode("no")
LABELED_HEADER = ["id", "sentence1", "sentence2", "is_duplicate"]
UNLABELED_HEADER = ["id", "sentence1", "sentence2"]
LABELS = {"0": 0, "0.0": 0, "1": 1, "1.0": 1}


@dataclass(frozen=True)
class QuoraPair:
    id: str
    sentence1: str
    sentence2: str
    label: int | None  # 1 = paraphrase, 0 = not, None = unlabeled (test-student)


def read_quora(path, limit=None):
    """The pairs of a Quora file in the course's format; `limit` keeps the first N. As in the course's loader, a
    malformed row (a wrong number of columns, a label not 0/1) is skipped (one warning) and blank lines ignored;
    an InputError names the file (and line) if it is missing, empty, not UTF-8, has a wrong header, no pairs, or
    mostly (over half) malformed rows."""
    text = read_course_file(path, limit).removeprefix("\ufeff")  # tolerate the byte-order mark some editors write
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    header = next(rows, None)
    if header is None:
        raise InputError(f"{path}: the file is empty; expected a header line {' '.join(LABELED_HEADER)}")
    header = [h.strip() for h in header]
    if header not in (LABELED_HEADER, UNLABELED_HEADER):
        raise InputError(f"{path}:1: header is {header}, expected {LABELED_HEADER} "
                         f"(or {UNLABELED_HEADER} for unlabeled test data), tab-separated")
    pairs, skipped = [], []  # skipped: ("line N", what is wrong with it)
    row_end = 1  # the line the last row read ended on
    try:
        for row in rows:
            row_end = rows.line_num
            if limit is not None and len(pairs) >= limit:
                break
            if not row:
                continue  # a blank line: the course's csv.DictReader skips these too
            label = LABELS.get(row[3].strip()) if len(row) == 4 else None
            if len(row) != len(header):
                skipped.append((f"line {row_end}", f"expected {len(header)} tab-separated columns, found {len(row)}"))
            elif len(header) == 4 and label is None:
                skipped.append((f"line {row_end}", f"is_duplicate is {row[3]!r}, not 0 or 1 (0.0 or 1.0)"))
            else:
                pairs.append(QuoraPair(row[0].strip(), row[1], row[2], label))
    except csv.Error as e:  # e.g. a " that opens a quoted field and is never closed
        raise InputError(f"{path}:{row_end + 1}: a row starting here runs on to line {rows.line_num} ({e}); "
                         f'is a " quote left open?') from None
    n_rows = len(pairs) + len(skipped)
    if n_rows == 0:
        raise InputError(f"{path}: has a header but no pairs")
    if len(skipped) > n_rows / 2:
        where, problem = skipped[0]
        raise InputError(f"{path}: {len(skipped)} of {n_rows} rows are malformed ({where}: {problem}); "
                         f"expected tab-separated {' '.join(header)}")
    warn_skipped(path, skipped, n_rows)
    return pairs


def warn_skipped(source, skipped, n_rows):
    """One warning about the skipped rows, if any (`skipped`: (where, what is wrong) for each)."""
    if skipped:
        shown = ", ".join(where for where, _ in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"warning: {source}: skipped {len(skipped)} malformed row{'s' if len(skipped) > 1 else ''} of "
              f"{n_rows} ({shown}; the first: {skipped[0][1]})", file=sys.stderr)


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
