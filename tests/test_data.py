"""data/: the course's files, prompts and answer tokens, batches and loss masks, and the Quora download."""

import csv
import hashlib
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import ROOT
from data import download as download_module
from data.batching import Example, batch_indices, collate, left_pad
from data.quora import (NO_TOKEN, YES_TOKEN, QuoraPair, paraphrase_example, paraphrase_prompt, preprocess_string,
                        read_quora)
from data.sonnets import read_sonnets, sonnet_example, split_prompt
from data.tokenizer import END_OF_TEXT
from fileio import InputError

# -----------------------------------------------------------------------------
# Quora files


QQP_ID = re.compile(r"\d+ [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # "82861 44ae9297-..."


def test_reads_the_sample_quora_files_as_the_course_does(sample_data, capsys):
    train = read_quora(sample_data / "quora-train.csv")
    dev = read_quora(sample_data / "quora-dev.csv")
    test = read_quora(sample_data / "quora-test-student.csv")
    assert (len(train), len(dev), len(test)) == (40, 30, 20)  # data/samples/README.md promises these
    for name, pairs in (("quora-train.csv", train), ("quora-dev.csv", dev)):
        assert [(preprocess_string(p.sentence1), preprocess_string(p.sentence2), p.label, p.id) for p in pairs] == \
            course_quora_rows(sample_data / name)
    with open(sample_data / "quora-test-student.csv", newline="") as f:  # the course's loader for test data
        assert [(p.id, p.sentence1, p.sentence2) for p in test] == [
            (r["id"], r["sentence1"], r["sentence2"]) for r in csv.DictReader(f, delimiter="\t")]
    assert {p.label for p in train} == {p.label for p in dev} == {0, 1}
    assert all(p.label is None for p in test)
    everything = train + dev + test
    assert all(QQP_ID.fullmatch(p.id) for p in everything) and len({p.id for p in everything}) == 90
    questions = {q for p in everything for q in (p.sentence1, p.sentence2)}
    # the awkward rows: csv-style "" quoting, a tab inside a quoted field, non-ASCII text
    assert {'What does "carpe diem" actually mean?', 'Is "irregardless" a real word?'} <= questions
    assert any("\t" in q for q in questions) and any(not q.isascii() for q in questions)
    assert capsys.readouterr().err == ""  # valid files: not one row skipped
    assert len(read_quora(sample_data / "quora-dev.csv", limit=7)) == 7


def write(tmp_path, text, name="q.csv"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


HEADER = "id\tsentence1\tsentence2\tis_duplicate\n"


@pytest.mark.parametrize("text, message", [
    ("", r"q.csv: the file is empty"),
    ("id,sentence1,sentence2,is_duplicate\n", r"q.csv:1: header is \['id,sentence1,sentence2,is_duplicate'\]"),
    ("id\tquestion1\tquestion2\tlabel\n", r"q.csv:1: header is"),
    ("1\ta?\tb?\t1.0\n2\tc?\td?\t0.0\n", r"q.csv:1: header is \['1', 'a\?', 'b\?', '1.0'\]"),  # no header line
    (HEADER, r"q.csv: has a header but no pairs"),
    (HEADER + "\n\n", r"q.csv: has a header but no pairs"),
    # mostly malformed: refused, naming the first bad line and what is wrong with it
    (HEADER + "1\ta?\tb?\t1.0\textra\n", r"q.csv: 1 of 1 rows are malformed \(line 2: expected 4 tab-separated "
                                           r"columns, found 5\)"),
    (HEADER + "1\ta?\tb?\tyes\n", r"q.csv: 1 of 1 rows are malformed \(line 2: is_duplicate is 'yes', not 0 or 1"),
    (HEADER + "1\ta?\tb?\t1\n2\ta?\tb?\t\n3\ta?\tb?\t0.5\n", r"q.csv: 2 of 3 rows .*line 3: is_duplicate is ''"),
    (HEADER.replace("\tis_duplicate", "") + "1\ta?\n2\tb?\tc?\n3\td?\n",
     r"2 of 3 rows .*line 2: expected 3 .* found 2"),
])
def test_bad_quora_files_name_file_and_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_quora(write(tmp_path, text))


def test_an_unclosed_quote_names_the_line_it_opens_on(tmp_path):
    text = HEADER + "1\ta?\tb?\t1.0\n" + '2\t"an open quote?\tb?\t0.0\n' + "3\tx?\ty?\t0.0\n" * 20000
    with pytest.raises(InputError, match=r"q.csv:3: a row starting here runs on to line \d+ \(field larger than "
                                         r"field limit .*\); is a \" quote left open\?"):
        read_quora(write(tmp_path, text))


def course_quora_rows(path):
    """The course's own loader (load_paraphrase_data for train/dev), for comparison: malformed rows are skipped."""
    rows = []
    with open(path) as fp:
        for record in csv.DictReader(fp, delimiter="\t"):
            try:
                rows.append((preprocess_string(record["sentence1"]), preprocess_string(record["sentence2"]),
                             int(float(record["is_duplicate"])), record["id"].lower().strip()))
            except Exception:  # the course's bare `except: pass`
                pass
    return rows


def test_malformed_quora_rows_are_skipped_with_one_warning(tmp_path, capsys):
    good = [f"{i}\tWhat is {i}?\tIs {i} a number?\t{i % 2}.0\n" for i in range(10)]
    bad = {3: "x\tonly two\n", 6: "y\ta?\tb?\tmaybe\n", 9: "z\ta?\n"}  # the data line each goes after
    lines = [HEADER]
    for i, row in enumerate(good):
        lines.append(row)
        if i in bad:
            lines.append(bad[i])
    lines.insert(5, "\n")  # a blank line: ignored, not counted, as csv.DictReader ignores it
    path = write(tmp_path, "".join(lines))
    pairs = read_quora(path)
    assert [p.id for p in pairs] == [str(i) for i in range(10)]
    assert [(preprocess_string(p.sentence1), preprocess_string(p.sentence2), p.label, p.id) for p in pairs] == \
        course_quora_rows(path)
    err = capsys.readouterr().err
    assert err == (f"warning: {path}: skipped 3 malformed rows of 13 (line 7, line 11, line 15; "
                   f"the first: expected 4 tab-separated columns, found 2)\n")
    assert len(read_quora(path, limit=5)) == 5
    assert "skipped 1 malformed row of 6 (line 7;" in capsys.readouterr().err  # rows past the limit are not read


def test_a_warning_names_the_first_five_skipped_lines(tmp_path, capsys):
    text = HEADER + "".join(f"{i}\ta?\tb?\t{'1' if i % 2 else 'bad'}\n" for i in range(14))  # 7 bad of 14
    assert len(read_quora(write(tmp_path, text))) == 7
    assert "skipped 7 malformed rows of 14 (line 2, line 4, line 6, line 8, line 10, ...; the first: " \
           "is_duplicate is 'bad'" in capsys.readouterr().err
    with pytest.raises(InputError, match="8 of 15 rows are malformed"):  # one more bad row: mostly malformed
        read_quora(write(tmp_path, text + "14\ta?\tb?\tbad\n"))


def test_non_utf8_bytes_name_the_file_line_and_byte(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes((HEADER + "1\ta?\tb?\t1.0\n").encode() + b"2\tcaf\xe9?\tb?\t0.0\n")
    with pytest.raises(InputError, match=r"q.csv:3: byte 0xe9 \(column 6\) is not valid UTF-8"):
        read_quora(path)
    path = tmp_path / "s.txt"
    path.write_bytes(b"Title\n\n1\n\nA line \xff\n")
    with pytest.raises(InputError, match=r"s.txt:5: byte 0xff \(column 8\) is not valid UTF-8"):
        read_sonnets(path)


@pytest.mark.parametrize("limit", [0, -5, 2.5, True, "3"])
def test_limit_must_be_a_positive_whole_number(tmp_path, limit):
    quora = write(tmp_path, HEADER + "1\ta?\tb?\t1.0\n")
    sonnets = write(tmp_path, "Title\n\n1\n\nA line\n", "s.txt")
    for read, path in ((read_quora, quora), (read_sonnets, sonnets)):
        with pytest.raises(ValueError, match=f"limit must be a positive whole number .* got {re.escape(repr(limit))}"):
            read(path, limit=limit)
    assert len(read_quora(quora, limit=1)) == len(read_sonnets(sonnets, limit=1)) == 1


def test_quora_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff" + HEADER + "1\ta?\tb?\t1.0\n").encode("utf-8"))
    assert read_quora(path) == [QuoraPair("1", "a?", "b?", 1)]


def test_missing_quora_file_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match=r"nope.csv: no such file; run `python -m data.download`"):
        read_quora(tmp_path / "nope.csv")


def test_paraphrase_prompt_is_the_courses():
    assert preprocess_string("What's the U.S. capital, really?") == "what 's the u .s . capital , really ?"
    assert paraphrase_prompt("How do I learn AI?", "How to learn AI?") == (
        'Question 1: "how do i learn ai ?"\nQuestion 2: "how to learn ai ?\nAre these questions asking the same thing?\n')


def test_answer_tokens_and_example(tokenizer):
    assert tokenizer.encode("yes") == [YES_TOKEN] and tokenizer.encode("no") == [NO_TOKEN]
    pair = QuoraPair("1", "How do I learn AI?", "How to learn AI?", 1)
    example = paraphrase_example(pair)
    assert tokenizer.decode(example.prompt) == paraphrase_prompt(pair.sentence1, pair.sentence2)
    assert example.target == [YES_TOKEN]
    assert paraphrase_example(QuoraPair("1", "a", "b", 0)).target == [NO_TOKEN]
    assert paraphrase_example(QuoraPair("1", "a", "b", None)).target == []


def test_tiktoken_matches_the_reference_gpt2_tokenizer(sample_data, tokenizer, tmp_path):
    """transformers' GPT2Tokenizer (BPE in Python) on OpenAI's own encoder.json and vocab.bpe: the very files
    tiktoken loads, from its cache (or the network), checked against OpenAI's sha256 as tiktoken checks them."""
    transformers = pytest.importorskip("transformers")
    import tiktoken.load
    files = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
             "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    for name, sha256 in files.items():
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        (tmp_path / name).write_bytes(tiktoken.load.read_file_cached(url, sha256))
    reference = transformers.GPT2Tokenizer(vocab=str(tmp_path / "encoder.json"), merges=str(tmp_path / "vocab.bpe"))
    assert len(reference) == 50257
    texts = [s.text for name in ("sonnets.txt", "TRUE_sonnets_held_out_dev.txt", "sonnets_held_out.txt")
             for s in read_sonnets(sample_data / name)]
    texts += [paraphrase_prompt(p.sentence1, p.sentence2)
              for name in ("quora-train.csv", "quora-dev.csv", "quora-test-student.csv")
              for p in read_quora(sample_data / name)]
    texts += ["Smørrebrød, déjà vu, こんにちは 🙂\ttab  two spaces\n\nand   trailing   "]
    for text in texts:
        assert tokenizer.encode_ordinary(text) == reference.encode(text)


def test_end_of_text_is_the_tokenizers(tokenizer):
    assert tokenizer.eot_token == END_OF_TEXT and tokenizer.decode([END_OF_TEXT]) == "<|endoftext|>"


def test_data_imports_neither_the_model_nor_the_network(tmp_path):
    """data/ stands below model.py, and importing it opens no connection (tiktoken loads on first use)."""
    code = ("import socket, sys\n"
            "def refuse(*a, **k): raise AssertionError('network used at import')\n"
            "socket.socket.connect = socket.socket.connect_ex = refuse\n"
            "import data.tokenizer, data.batching, data.quora, data.sonnets, data.download\n"
            "assert 'model' not in sys.modules, 'data/ imported model.py'\n"
            "import model\n"
            "assert model.END_OF_TEXT == data.tokenizer.END_OF_TEXT\n")
    env = {"PATH": "", "TIKTOKEN_CACHE_DIR": str(tmp_path)}  # an empty cache: any load would need the network
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_tokenizer_failure_says_to_set_the_cache_dir(monkeypatch):
    import tiktoken

    from data import tokenizer as tokenizer_module

    def offline(name):
        raise ConnectionError("no route to host")

    tokenizer_module.get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        with pytest.raises(InputError, match="ConnectionError: no route to host.*set TIKTOKEN_CACHE_DIR"):
            tokenizer_module.get_tokenizer()
    finally:
        tokenizer_module.get_tokenizer.cache_clear()


# -----------------------------------------------------------------------------
# sonnet files


def course_split(path):
    """The course's own parser (SonnetsDataset._load_sonnets), for comparison."""
    return [s.strip() for s in re.split(r"\n\s*\d+\s*\n", path.read_text(encoding="utf-8"))[1:]]


def check_sonnet_files(directory, train_numbers, dev_numbers, test_numbers):
    """The four sonnet files in `directory` read as the course reads them, with these sonnet numbers."""
    train = read_sonnets(directory / "sonnets.txt")
    dev_prompts = read_sonnets(directory / "sonnets_held_out_dev.txt")
    dev_true = read_sonnets(directory / "TRUE_sonnets_held_out_dev.txt")
    test_prompts = read_sonnets(directory / "sonnets_held_out.txt")
    assert [s.number for s in train] == list(train_numbers)
    assert [s.number for s in dev_prompts] == [s.number for s in dev_true] == list(dev_numbers)
    assert [s.number for s in test_prompts] == list(test_numbers)
    assert all(len(s.text.split("\n")) == 3 for s in dev_prompts + test_prompts)
    assert all(len(s.text.split("\n")) == 14 for s in dev_true)
    for prompt, true in zip(dev_prompts, dev_true):
        assert split_prompt(true.text)[0] == prompt.text  # the prompt is the true sonnet's first 3 lines
    for name in ("sonnets.txt", "sonnets_held_out_dev.txt", "TRUE_sonnets_held_out_dev.txt", "sonnets_held_out.txt"):
        assert [s.text for s in read_sonnets(directory / name)] == course_split(directory / name)
    assert len(read_sonnets(directory / "sonnets.txt", limit=5)) == 5
    return train


def test_reads_the_sample_sonnet_files(sample_data):
    train = check_sonnet_files(sample_data, range(1, 11), range(11, 15), range(15, 18))
    assert all(len(s.text.split("\n")) == 14 for s in train)


def test_reads_the_course_sonnet_files(course_data):
    train = check_sonnet_files(course_data, range(1, 132), range(132, 144), range(145, 157))
    assert train[0].text.startswith("From fairest creatures we desire increase,\nThat thereby")
    assert train[0].text.endswith("To eat the world's due, by the grave and thee.")


def test_malformed_sonnet_files(tmp_path):
    with pytest.raises(InputError, match="found no numbered sonnets"):
        read_sonnets(write(tmp_path, "Sonnets\nby nobody\n\nno numbers here\n", "s.txt"))
    with pytest.raises(InputError, match=r"s.txt:6: sonnet 2 has no lines"):
        read_sonnets(write(tmp_path, "Title\n\n1\n\nA line\n2\n\n\n", "s.txt"))
    with pytest.raises(InputError, match="no such file"):
        read_sonnets(tmp_path / "missing.txt")


def test_split_prompt():
    text = "one\ntwo\nthree\nfour\nfive"
    assert split_prompt(text) == ("one\ntwo\nthree", "\nfour\nfive")
    with pytest.raises(ValueError, match="nothing after"):
        split_prompt("one\ntwo\nthree")


def test_sonnet_example_learns_the_whole_sonnet_and_to_stop(sample_data, tokenizer):
    sonnet = read_sonnets(sample_data / "sonnets.txt")[0]
    example = sonnet_example(sonnet)
    assert example.prompt == [] and example.target[-1] == END_OF_TEXT
    assert tokenizer.decode(example.target[:-1]) == sonnet.text


# -----------------------------------------------------------------------------
# batches and loss masks


def test_collate_masks_by_position_not_by_token_id():
    # the second target ends with END_OF_TEXT, which is also the pad id: it must still be in the loss mask
    examples = [Example([5, 6, 7], [8]), Example([9], [10, 11, END_OF_TEXT]), Example([1, 2], [])]
    batch = collate(examples)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, END_OF_TEXT], [1, 2, END_OF_TEXT, END_OF_TEXT]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert batch.lengths.tolist() == [4, 4, 2]
    with pytest.raises(ValueError, match="example 1 has 5 tokens"):
        collate([Example([1], [2]), Example([1, 2, 3], [4, 5])], max_len=4)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        collate([Example([], [])])
    with pytest.raises(ValueError, match="at least one example"):
        collate([])


def test_loss_mask_covers_exactly_the_answer_tokens(sample_data):
    pairs = read_quora(sample_data / "quora-dev.csv")[:8]
    batch = collate([paraphrase_example(p) for p in pairs])
    for i, p in enumerate(pairs):
        n = batch.lengths[i].item()
        assert batch.loss_mask[i].nonzero().flatten().tolist() == [n - 1]  # the answer: the last real token
        assert batch.input_ids[i, n - 1].item() == (YES_TOKEN if p.label else NO_TOKEN)
        assert batch.attention_mask[i].sum().item() == n


def test_left_pad_ends_every_row_at_the_last_column():
    ids, mask = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [END_OF_TEXT, END_OF_TEXT, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="one or more prompts, none empty"):
            left_pad(bad)


def test_batch_indices():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10] * 10
    eval_batches = batch_indices(lengths, 8)
    flat = [i for b in eval_batches for i in b]
    assert sorted(flat) == list(range(100))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    a = batch_indices(lengths, 8, shuffle=True, seed=1, pool_batches=5)
    assert sorted(i for b in a for i in b) == list(range(100))
    assert a == batch_indices(lengths, 8, shuffle=True, seed=1, pool_batches=5)
    assert a != batch_indices(lengths, 8, shuffle=True, seed=2, pool_batches=5)
    # sorted within pools of 40, a batch's lengths span far less than in batches cut from a plain shuffle
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa: E731
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()
    plain = [order[i:i + 8] for i in range(0, 100, 8)]
    assert spread(a) < spread(plain) / 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive whole number, got 0"),
    (dict(batch_size=-8), "batch_size must be a positive whole number, got -8"),
    (dict(batch_size=2.5), "batch_size must be a positive whole number, got 2.5"),
    (dict(batch_size=8, shuffle=True, pool_batches=0), "pool_batches must be a positive whole number, got 0"),
])
def test_batch_indices_rejects_sizes_that_make_no_batches(kwargs, message):
    with pytest.raises(ValueError, match=message):
        batch_indices([3, 1, 2], **kwargs)


# -----------------------------------------------------------------------------
# the Quora download: GLUE QQP -> the course's format


def fake_qqp_zip(path, n_train=50, n_dev=20):
    rows = lambda start, n: "".join(  # noqa: E731
        f"{i}\t{2 * i}\t{2 * i + 1}\tWhat is \"{i}\"?\tIs {i}, a number?\t{i % 2}\n" for i in range(start, start + n))
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("QQP/train.tsv", header + rows(0, n_train))
        z.writestr("QQP/dev.tsv", header + rows(n_train, n_dev))
        z.writestr("QQP/test.tsv", "id\tquestion1\tquestion2\n")


def test_qqp_becomes_the_course_format(tmp_path):
    fake_qqp_zip(tmp_path / "QQP-clean.zip")
    pairs = download_module.read_qqp_pairs(tmp_path / "QQP-clean.zip")
    assert len(pairs) == 70 and pairs[0] == ("qqp-0", 'What is "0"?', "Is 0, a number?", 0)
    train, dev, test = download_module.split_pairs(pairs, dev_size=10, test_size=15)
    assert (len(train), len(dev), len(test)) == (45, 10, 15)
    assert sorted(train + dev + test) == sorted(pairs)
    assert download_module.split_pairs(list(reversed(pairs)), dev_size=10, test_size=15) == (train, dev, test)
    download_module.write_quora(tmp_path / "quora-dev.csv", dev)
    download_module.write_quora(tmp_path / "quora-test-student.csv", test, with_labels=False)
    assert read_quora(tmp_path / "quora-dev.csv") == [QuoraPair(*p) for p in dev]
    assert read_quora(tmp_path / "quora-test-student.csv") == [QuoraPair(*p[:3], None) for p in test]


def test_malformed_qqp_rows_are_skipped_and_reported(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as z:
        header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        z.writestr("QQP/train.tsv", header + "1\t2\t3\tq1\n" + "4\t5\t6\tq?\tr?\t1\n")
        z.writestr("QQP/dev.tsv", header + "7\t8\t9\tq?\tr?\tmaybe\n")
    assert download_module.read_qqp_pairs(tmp_path / "bad.zip") == [("qqp-4", "q?", "r?", 1)]
    assert "skipped 2 malformed rows of 3 (QQP/train.tsv:2, QQP/dev.tsv:2; the first: expected 6 tab-separated " \
           "fields, found 4)" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "wrong.zip", "w") as z:
        z.writestr("QQP/train.tsv", "a\tb\n")
        z.writestr("QQP/dev.tsv", "a\tb\n")
    with pytest.raises(InputError, match=r"wrong.zip:QQP/train.tsv:1: unexpected header"):
        download_module.read_qqp_pairs(tmp_path / "wrong.zip")
    (tmp_path / "notzip.zip").write_bytes(b"html error page")
    with pytest.raises(InputError, match="not a zip archive"):
        download_module.read_qqp_pairs(tmp_path / "notzip.zip")


def test_quora_download_end_to_end(tmp_path, monkeypatch, capsys, file_server):
    """QQP from a server on this machine, converted into the four files the course's reader accepts."""
    fake_qqp_zip(tmp_path / "QQP-clean.zip", n_train=60, n_dev=40)
    file_server.payload = (tmp_path / "QQP-clean.zip").read_bytes()
    monkeypatch.setattr(download_module, "QQP_URL", file_server.url)
    data_dir = tmp_path / "data"
    download_module.fetch_quora(data_dir, dev_size=10, test_size=20)
    assert "70 train, 10 dev, 20 test pairs" in capsys.readouterr().out
    train, dev = read_quora(data_dir / "quora-train.csv"), read_quora(data_dir / "quora-dev.csv")
    test, student = read_quora(data_dir / "quora-test.csv"), read_quora(data_dir / "quora-test-student.csv")
    assert (len(train), len(dev), len(test)) == (70, 10, 20)
    assert [p.id for p in student] == [p.id for p in test] and all(p.label is None for p in student)
    assert len({p.id for p in train + dev + test}) == 100


def test_download_leaves_the_courses_own_files_alone(tmp_path, capsys):
    for name in ("quora-train.csv", "quora-dev.csv", "quora-test-student.csv"):
        (tmp_path / name).write_text("the course's file")
    download_module.fetch_quora(tmp_path)  # no network needed
    assert "using the files already in" in capsys.readouterr().out
    assert (tmp_path / "quora-dev.csv").read_text() == "the course's file"


def pin_the_sample_sonnets(monkeypatch, sample_data):
    """data.download checks sonnet files against the course's sha256; let it expect the samples' instead, so the
    tests can stand the samples in for the course's files."""
    monkeypatch.setattr(download_module, "SONNET_FILES", {
        name: hashlib.sha256((sample_data / name).read_bytes()).hexdigest() for name in download_module.SONNET_FILES})


def test_offline_download_names_every_missing_file(tmp_path, monkeypatch, sample_data):
    pin_the_sample_sonnets(monkeypatch, sample_data)
    monkeypatch.setattr(download_module, "HANDOUT", "http://127.0.0.1:9/")  # refused: offline
    monkeypatch.setattr(download_module, "QQP_URL", "http://127.0.0.1:9/QQP-clean.zip")
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit, match=re.escape(
            f"could not download http://127.0.0.1:9/sonnets.txt to {data_dir}/sonnets.txt: ") + ".*" + re.escape(
            f"Offline, put the 7 missing files into {data_dir}/ by hand: sonnets.txt, sonnets_held_out_dev.txt, "
            f"TRUE_sonnets_held_out_dev.txt, sonnets_held_out.txt (the course handout's data/ folder) and "
            f"quora-train.csv, quora-dev.csv, quora-test-student.csv (the course's Quora files).")):
        download_module.main(["--data-dir", str(data_dir)])
    with pytest.raises(SystemExit, match=r"put the 4 missing files .*sonnets_held_out.txt \(the course handout's "
                                         r"data/ folder\)\.$"):
        download_module.main(["--data-dir", str(data_dir), "--skip-quora"])
    for name in download_module.SONNET_FILES:  # the sonnet files are there: only Quora is missing now
        (data_dir / name).write_bytes((sample_data / name).read_bytes())
    with pytest.raises(SystemExit, match=r"QQP-clean.zip: .*put the 3 missing files into .* by hand: quora-train.csv, "
                                         r"quora-dev.csv, quora-test-student.csv \(the course's Quora files\)\.$"):
        download_module.main(["--data-dir", str(data_dir)])
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(download_module.SONNET_FILES)  # nothing new


def test_download_checks_the_sonnet_files_already_there(tmp_path, sample_data, monkeypatch, file_server):
    pin_the_sample_sonnets(monkeypatch, sample_data)
    monkeypatch.setattr(download_module, "HANDOUT", file_server.url + "/")  # any request would show up
    for name in download_module.SONNET_FILES:
        (tmp_path / name).write_bytes((sample_data / name).read_bytes())
    download_module.main(["--data-dir", str(tmp_path), "--skip-quora"])  # all four verified: nothing fetched
    text = (tmp_path / "sonnets_held_out.txt").read_bytes()
    (tmp_path / "sonnets_held_out.txt").write_bytes(text[:len(text) // 2])  # truncated
    (tmp_path / "sonnets.txt").unlink()
    expected = download_module.SONNET_FILES["sonnets_held_out.txt"]
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(tmp_path))}/sonnets_held_out.txt: sha256 is "
                                         rf"[0-9a-f]{{64}}, expected {expected} .*delete it and run again"):
        download_module.main(["--data-dir", str(tmp_path), "--skip-quora"])
    assert file_server.requests == [] and not (tmp_path / "sonnets.txt").exists()  # checked before any download


def test_download_refuses_a_mix_of_course_and_qqp_quora_files(tmp_path, sample_data, monkeypatch):
    pin_the_sample_sonnets(monkeypatch, sample_data)
    for name in download_module.SONNET_FILES:
        (tmp_path / name).write_bytes((sample_data / name).read_bytes())
    (tmp_path / "quora-dev.csv").write_text("the course's file")
    with pytest.raises(SystemExit, match=r"has quora-dev.csv but not quora-train.csv, quora-test-student.csv: copy"):
        download_module.main(["--data-dir", str(tmp_path)])


@pytest.mark.parametrize("name", ["sonnets_held_out.txt", "quora-dev.csv", "QQP-clean.zip", "sonnets.txt.part"])
def test_a_folder_in_a_data_files_place_is_refused_before_any_download(tmp_path, monkeypatch, file_server, name):
    monkeypatch.setattr(download_module, "HANDOUT", file_server.url + "/")  # any request would show up
    monkeypatch.setattr(download_module, "QQP_URL", file_server.url)
    (tmp_path / name).mkdir()
    with pytest.raises(SystemExit) as exit_info:
        download_module.main(["--data-dir", str(tmp_path)])
    assert exit_info.value.code == (f"error: {tmp_path / name}: is a folder, where data.download puts the file "
                                    f"{name}; move or rename the folder")
    assert file_server.requests == [] and [p.name for p in tmp_path.iterdir()] == [name]


def test_download_needs_a_writable_data_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^error: --data-dir .*file/data': cannot be created or written \(Not a directory\)$"):
        download_module.main(["--data-dir", str(tmp_path / "file" / "data")])
