"""
Shakespeare's sonnets, as the Stanford CS224N GPT-2 project uses them.

sonnets.txt holds a header (the Folger edition's title lines), then every sonnet as a line with its number,
a blank line, and its lines (usually 14). The held-out files hold each sonnet's first 3 lines (the prompt),
TRUE_sonnets_held_out_dev.txt the same sonnets in full (chrF's references).
"""

import re
from dataclasses import dataclass

from data import read_course_file
from data.batching import Example
from data.tokenizer import END_OF_TEXT, encode
from fileio import InputError

PROMPT_LINES = 3
# The course splits a file on its number lines, exactly like this: re.split(r'\n\s*\d+\s*\n', text)
NUMBER_LINE = re.compile(r"\n\s*(\d+)\s*\n")


@dataclass(frozen=True)
class Sonnet:
    number: int
    text: str  # the sonnet's lines joined by "\n", with surrounding whitespace stripped as the course does


def read_sonnets(path, limit=None):
    """Every sonnet in a file of the course's format (training, held-out or TRUE); `limit` keeps the first N."""
    text = read_course_file(path, limit).replace("\r\n", "\n").replace("\r", "\n")  # as universal newlines
    numbers = list(NUMBER_LINE.finditer(text))  # the same matches re.split splits on
    if not numbers:
        raise InputError(f"{path}: found no numbered sonnets (a line holding only a number, then the sonnet)")
    sonnets = []
    for this, following in zip(numbers, numbers[1:] + [None]):
        body = text[this.end():following.start() if following else len(text)].strip()
        if not body:
            line = text.count("\n", 0, this.start(1)) + 1
            raise InputError(f"{path}:{line}: sonnet {this.group(1)} has no lines")
        sonnets.append(Sonnet(int(this.group(1)), body))
    return sonnets[:limit]


def split_prompt(sonnet_text, n_lines=PROMPT_LINES):
    """(first n lines, the rest starting with its newline): the task's prompt and the continuation to write."""
    lines = sonnet_text.split("\n")
    if len(lines) <= n_lines:
        raise ValueError(f"a sonnet of {len(lines)} lines has nothing after its first {n_lines}")
    prompt = "\n".join(lines[:n_lines])
    return prompt, sonnet_text[len(prompt):]


def sonnet_example(sonnet):
    """For SFT: no prompt, the whole sonnet and end-of-text the target (so the model learns openings, and to stop)."""
    return Example(prompt=[], target=encode(sonnet.text) + [END_OF_TEXT])


def continuation_examples(sonnets):
    """Each sonnet as its task poses it: the first 3 lines, then the true rest and end-of-text as the target."""
    examples = []
    for sonnet in sonnets:
        prompt, rest = split_prompt(sonnet.text)
        examples.append(Example(encode(prompt), encode(rest) + [END_OF_TEXT]))
    return examples
