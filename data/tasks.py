"""The two tasks' files under the course's names, and what a training run reads from them."""

from pathlib import Path

from data.quora import read_quora
from data.sonnets import read_sonnets
from fileio import InputError

QUORA = {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}  # test: no labels
SONNETS = {
    "train": "sonnets.txt",
    "dev": "sonnets_held_out_dev.txt",  # the dev prompts: each sonnet's first 3 lines
    "dev_true": "TRUE_sonnets_held_out_dev.txt",  # the same sonnets in full: chrF's references
    "test": "sonnets_held_out.txt",  # the test prompts
}


def load_task_data(config):
    """(training records, dev set) for a run's config (task, data_dir, train_limit, dev_limit): Quora pairs, or
    sonnets and (dev prompts, true dev sonnets)."""
    data_dir = Path(config["data_dir"])
    if config["task"] == "paraphrase":
        train = read_quora(data_dir / QUORA["train"], limit=config.get("train_limit"))
        dev = read_quora(data_dir / QUORA["dev"], limit=config.get("dev_limit"))
        if any(p.label is None for p in train + dev):
            raise InputError(f"{data_dir}: the Quora train and dev files need the is_duplicate column")
        return train, dev
    train = read_sonnets(data_dir / SONNETS["train"], limit=config.get("train_limit"))
    return train, (read_sonnets(data_dir / SONNETS["dev"]), read_sonnets(data_dir / SONNETS["dev_true"]))
