"""The two tasks' data: readers for the course's files, prompts, batches with loss masks, and downloads.

Data files live here, beside this code, under the course's names (data/quora-train.csv, data/sonnets.txt, ...);
`python -m data.download` fetches them and git ignores them.
"""


def check_limit(limit):
    """The readers' `limit` (keep the first N examples): a positive whole number, or None for all of them."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ValueError(f"limit must be a positive whole number of examples (or None for all), got {limit!r}")
