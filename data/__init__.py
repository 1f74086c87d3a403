"""The two tasks' data: readers for the course's files, prompts, batches with loss masks, and downloads
(`python -m data.download` puts the files here, under the course's names; git ignores them)."""

from pathlib import Path

from fileio import InputError, read_text


def check_count(name, value, what=""):
    """A positive whole number (batch_size, a reader's limit, ...), else a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number{what}, got {value!r}")


def read_course_file(path, limit):
    """The text of one of the course's files, for a reader whose `limit` (None for all) keeps its first N records."""
    if limit is not None:
        check_count("limit", limit, " of examples (or None for all)")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file; run `python -m data.download` or copy the course's files into data/")
    return read_text(path)
