"""
Fetch the two tasks' data into data/, under the Stanford CS224N project's file names (python -m data.download):
the sonnet files from a pinned copy of the course's handout (sha256-checked); for Quora, the course's three
files if you copy them into data/, else files in the same format built from GLUE's QQP labelled pairs, shuffled
with a fixed seed and cut into the course's sizes (quora-test.csv keeps the test labels, quora-test-student.csv
not). Files already there are never touched; offline, the error names every missing file and where to put it.
"""

import csv
import random
import zipfile
from pathlib import Path

import flags
from data.quora import LABELED_HEADER, UNLABELED_HEADER, warn_skipped
from data.tasks import QUORA
from fileio import InputError, atomic_open, check_sha256, download, writable_dir

DATA_DIR = Path(__file__).resolve().parent
HANDOUT = "https://raw.githubusercontent.com/ehersch/cs224n_gpt/306e163a0430dcc26697debebeefedffdd016bc7/data/"
SONNET_FILES = {  # name -> sha256
    "sonnets.txt": "1e97adb7182237e431bff16d207c7c1400391cce7a6417df06080205d9257237",
    "sonnets_held_out_dev.txt": "309ae8da81a24de61a261c291c1299f5c6bfbf4e6b7d1d5b50bd15b6c1770afd",
    "TRUE_sonnets_held_out_dev.txt": "fb41ee87e70107f554b658c8de07a6ae905298db09da84794dfaa2a61e892a1f",
    "sonnets_held_out.txt": "daf7afd5d932acbe584d8c6e78c2669f9e97aa4967579d85ed4975b22ae33071",
}
QQP_URL = "https://dl.fbaipublicfiles.com/glue/data/QQP-clean.zip"
COURSE_QUORA_FILES = tuple(QUORA.values())  # the three the course gives
COURSE_DEV_SIZE, COURSE_TEST_SIZE = 40_429, 80_858
SPLIT_SEED = 11711  # the course's default seed
SETTINGS = {
    "data_dir": (DATA_DIR, Path, None, "where the data files go"),
    "skip_quora": (False, bool, None, "fetch the sonnets only"),
}


def check_present_files(data_dir, quora=True):
    """Before any download: no file's place is taken by a folder, sonnet files already there have their sha256,
    and the Quora files are the course's three or none (to be built from QQP), never a mix."""
    names = [*SONNET_FILES, *(name + ".part" for name in SONNET_FILES)]
    if quora:
        names += [*COURSE_QUORA_FILES, "quora-test.csv", "QQP-clean.zip", "QQP-clean.zip.part"]
    for path in [data_dir / name for name in names]:
        if path.exists() and not path.is_file():
            raise InputError(f"{path}: is a folder, where data.download puts the file {path.name}; "
                             f"move or rename the folder")
    for name, sha256 in SONNET_FILES.items():
        if (data_dir / name).exists():
            check_sha256(data_dir / name, sha256)
    present = [name for name in COURSE_QUORA_FILES if (data_dir / name).exists()]
    if quora and 0 < len(present) < len(COURSE_QUORA_FILES):
        missing = [name for name in COURSE_QUORA_FILES if name not in present]
        raise InputError(f"{data_dir}/ has {', '.join(present)} but not {', '.join(missing)}: copy the course's "
                         f"missing file there, or delete the Quora files to build all of them from GLUE QQP "
                         f"(files from the two sources would share pairs across splits)")


def offline_hint(data_dir, quora=True):
    """Every data file still missing, by name, and where to put it."""
    sonnets = [name for name in SONNET_FILES if not (data_dir / name).exists()]
    quora_files = [name for name in COURSE_QUORA_FILES if quora and not (data_dir / name).exists()]
    where = [f"{', '.join(sonnets)} (the course handout's data/ folder)"] if sonnets else []
    where += [f"{', '.join(quora_files)} (the course's Quora files)"] if quora_files else []
    return (f"Offline, put the {len(sonnets) + len(quora_files)} missing files into {data_dir}/ by hand: "
            f"{' and '.join(where)}.")


def read_qqp_pairs(zip_path):
    """The labelled pairs of GLUE QQP's train.tsv and dev.tsv: a list of (id, question1, question2, label).
    Rows that are not 6 tab-separated fields ending in a 0/1 label are skipped and reported (one bad row among
    400,000 of someone else's file should not stop you)."""
    pairs, skipped = [], []  # skipped: (member:line, what is wrong with it)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise InputError(f"{zip_path}: not a zip archive; delete it and run again") from None
    with archive:
        for member in ("QQP/train.tsv", "QQP/dev.tsv"):
            try:
                lines = archive.read(member).decode("utf-8").split("\n")
            except KeyError:
                raise InputError(f"{zip_path}: has no {member}; is it GLUE's QQP-clean.zip?") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{zip_path}:{member}: not UTF-8 ({e}); delete it and run again") from None
            header = lines[0].rstrip("\r").split("\t")
            if header != ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]:
                raise InputError(f"{zip_path}:{member}:1: unexpected header {header}")
            for line_number, line in enumerate(lines[1:], start=2):
                if line == "":
                    continue
                fields = line.rstrip("\r").split("\t")
                if len(fields) != 6:
                    skipped.append((f"{member}:{line_number}", f"expected 6 tab-separated fields, found {len(fields)}"))
                elif fields[5] not in ("0", "1"):
                    skipped.append((f"{member}:{line_number}", f"is_duplicate is {fields[5]!r}, not 0 or 1"))
                else:
                    pairs.append((f"qqp-{fields[0]}", fields[3], fields[4], int(fields[5])))
    warn_skipped(zip_path, skipped, len(pairs) + len(skipped))
    return pairs


def split_pairs(pairs, seed=SPLIT_SEED, dev_size=COURSE_DEV_SIZE, test_size=COURSE_TEST_SIZE):
    """Shuffle with a fixed seed, then cut: (train, dev, test)."""
    pairs = sorted(pairs)  # a canonical order first, so the split does not depend on the archive's order
    random.Random(seed).shuffle(pairs)
    return pairs[dev_size + test_size:], pairs[:dev_size], pairs[dev_size:dev_size + test_size]


def write_quora(path, pairs, with_labels=True):
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(LABELED_HEADER if with_labels else UNLABELED_HEADER)
        for pair_id, s1, s2, label in pairs:
            writer.writerow([pair_id, s1, s2] + ([f"{label:.1f}"] if with_labels else []))


def fetch_quora(data_dir, dev_size=COURSE_DEV_SIZE, test_size=COURSE_TEST_SIZE):
    if all((data_dir / name).exists() for name in COURSE_QUORA_FILES):
        print(f"Quora: using the files already in {data_dir}/")
        return
    zip_path = download(QQP_URL, data_dir / "QQP-clean.zip", hint=offline_hint(data_dir))
    train, dev, test = split_pairs(read_qqp_pairs(zip_path), dev_size=dev_size, test_size=test_size)
    for name, pairs, with_labels in (("quora-train.csv", train, True), ("quora-dev.csv", dev, True),
                                     ("quora-test.csv", test, True), ("quora-test-student.csv", test, False)):
        if not (data_dir / name).exists():
            write_quora(data_dir / name, pairs, with_labels)
    print(f"Quora: {len(train)} train, {len(dev)} dev, {len(test)} test pairs from GLUE QQP in {data_dir}/")


def fetch(config):
    data_dir, quora = writable_dir(config["data_dir"], "--data-dir"), not config["skip_quora"]
    check_present_files(data_dir, quora)
    for name, sha256 in SONNET_FILES.items():
        download(HANDOUT + name, data_dir / name, sha256=sha256, hint=offline_hint(data_dir, quora))
    print(f"Sonnets: {', '.join(SONNET_FILES)} in {data_dir}/")
    if quora:
        fetch_quora(data_dir)


def main(argv=None):
    flags.main(fetch, SETTINGS, __doc__, argv)


if __name__ == "__main__":
    main()
