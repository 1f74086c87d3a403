"""fileio.py: safetensors against the safetensors library, atomic writes, folder locks, resumable downloads."""

import errno
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

import fileio
from conftest import ROOT
from fileio import (InputError, atomic_open, download, lock_dir, read_cache, read_json, read_safetensors, read_text,
                    writable_dir, write_json, write_safetensors)

TENSORS = {
    "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
    "f64": torch.randn(1, dtype=torch.float64), "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_safetensors_round_trip_with_metadata(tmp_path):
    write_safetensors(tmp_path / "t.safetensors", TENSORS, metadata={"alpha": 16})
    tensors, metadata = read_safetensors(tmp_path / "t.safetensors")
    assert_same(tensors, TENSORS)
    assert metadata == {"alpha": "16"}


def test_safetensors_agrees_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file(TENSORS, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert_same(read_safetensors(tmp_path / "theirs.safetensors")[0], TENSORS)
    write_safetensors(tmp_path / "ours.safetensors", TENSORS)
    assert_same(st.load_file(tmp_path / "ours.safetensors"), TENSORS)


def test_atomic_open_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with atomic_open(path) as f:
        f.write("new")
    assert path.read_text() == "new"


class FullDisk:
    """A file on a disk with `room` bytes left: what fits is written, then the write fails as a full disk's does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def torch_save(path, obj):
    """As checkpoint.pt is saved."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


@pytest.mark.parametrize("write, new", [
    (write_safetensors, {"w": torch.randn(100, 100)}), (write_json, list(range(1000))), (torch_save, torch.randn(10000)),
])
def test_a_full_disk_is_one_line_and_leaves_the_previous_file(tmp_path, monkeypatch, write, new):
    write(tmp_path / "whole", new)
    # write_safetensors knows its size before it writes; the others say how far they got
    needed = (f"{(tmp_path / 'whole').stat().st_size:,} bytes" if write is write_safetensors
              else "more than the 1,000 bytes written")
    folder, old = tmp_path / "run", {"w": torch.randn(3)}
    write_safetensors(folder / "file", old)
    monkeypatch.setattr(fileio, "open", lambda *args, **kwargs: FullDisk(open(*args, **kwargs), 1000), raising=False)
    with pytest.raises(InputError, match=rf"^{re.escape(str(folder))}: the disk is full: writing file needed {needed}, "
                                         rf"and [\d,]+ bytes are free; nothing was changed: free some space and run "
                                         rf"again \(--resume continues a training run from its last checkpoint\)$"):
        write(folder / "file", new)
    assert [p.name for p in folder.iterdir()] == ["file"]  # no temporary file left
    assert_same(read_safetensors(folder / "file")[0], old)  # the previous file is untouched


@pytest.mark.parametrize("write, read, value", [
    (write_safetensors, lambda path: read_safetensors(path)[0], {"chosen": torch.randn(8), "rejected": torch.randn(8)}),
    (write_json, read_json, {"rejected": [[1, 2, 3], [4, 5]], "prompts": [[6], [7]]}),
])
def test_a_damaged_cache_is_a_miss_with_a_warning(tmp_path, capsys, write, read, value):
    path = tmp_path / "cache" / "reference"
    assert read_cache(path, read) is None  # none there yet: a miss, and no warning
    write(path, value)
    cached = read_cache(path, read)
    assert cached.keys() == value.keys()
    assert all(torch.equal(cached[k], v) if torch.is_tensor(v) else cached[k] == v for k, v in value.items())
    assert capsys.readouterr().err == ""
    path.write_bytes(path.read_bytes()[:-5])  # truncated, as by a crash or a full disk outside atomic_open
    with pytest.raises(InputError, match=re.escape(str(path))):  # read directly, a damaged file is an error
        read(path)
    assert read_cache(path, read) is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path}") and err.endswith("; deleting it and computing it again (it is a cache)\n")
    assert err.count("\n") == 1 and not path.exists()


def test_read_json_names_the_file_and_line(tmp_path):
    (tmp_path / "results.json").write_text('{\n  "score": 0.5,\n  "history": [\n')
    with pytest.raises(InputError, match=r"results.json:4: not valid JSON \(Expecting value, column 1\)$"):
        read_json(tmp_path / "results.json")


def test_read_text_names_the_line_and_byte_that_are_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nna\u00efve\n".encode("utf-8") + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt:3: byte 0xe9 \(column 4\) is not valid UTF-8"):
        read_text(path)
    path.write_text("first line\nna\u00efve\n", encoding="utf-8")
    assert read_text(path) == "first line\nna\u00efve\n"


def test_writable_dir(tmp_path):
    assert writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # proved writable, and nothing left behind: not even the folders
    (tmp_path / "kept").mkdir()
    writable_dir(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []  # a folder that was there stays; the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"--out-dir .*file': is a file, not a directory"):
        writable_dir(tmp_path / "file", "--out-dir")
    with pytest.raises(InputError, match=r"--out-dir .*file/sub': cannot be created or written \(Not a directory\)"):
        writable_dir(tmp_path / "file" / "sub", "--out-dir")


def test_under_torchrun_only_rank_0_checks_a_folder(tmp_path, monkeypatch):
    """torchrun's processes all check out_dir; two making and removing one folder at once failed each other
    ("is a file, not a directory" when one removed it between the other's exists() and is_dir())."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("RANK", "1")
    assert writable_dir(tmp_path / "file" / "sub") == tmp_path / "file" / "sub"  # rank 1 leaves it to rank 0
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="cannot be created or written"):
        writable_dir(tmp_path / "file" / "sub")


def hold_lock(folder):
    """Another process that takes lock_dir(folder), says so on its stdout, and sleeps until it is killed."""
    code = ("import sys, time\nfrom fileio import lock_dir\n"
            "with lock_dir(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'run'))}: in use by process "
                                             rf"{holder.pid} \(another run is writing this folder\); wait"):
            with lock_dir(tmp_path / "run"):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with lock_dir(tmp_path / "run"):  # the OS released the lock with the process
        assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"


def test_lock_dir_is_reentrant_and_released_on_exit(tmp_path):
    with lock_dir(tmp_path / "study"):
        with lock_dir(tmp_path / "study"):  # the same folder again in this process: no deadlock, no error
            with lock_dir(tmp_path / "study" / "run-1"):  # a run inside the study holds its own folder
                pass
        assert tmp_path.joinpath("study", ".lock").read_text() == f"{os.getpid()}\n"  # still held after the inner
    holder = hold_lock(tmp_path / "study")  # released: another process can take it now
    holder.kill()
    holder.wait()


# -----------------------------------------------------------------------------
# downloads, from a server on this machine

PAYLOAD = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture
def server(file_server):
    file_server.payload = PAYLOAD
    return file_server


def test_download_checks_the_hash_and_renames(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    assert download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest()) == dest
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "sub" / "file.bin.part").exists()
    download(server.url, dest)  # already there: no request at all
    assert server.requests == [0]


def test_interrupted_download_resumes(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cut = 30000
    with pytest.raises(InputError, match="run again to resume"):
        download(server.url, dest)
    assert not dest.exists() and (tmp_path / "file.bin.part").stat().st_size == 30000
    download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert server.requests == [0, 30000]
    assert dest.read_bytes() == PAYLOAD


def test_hash_mismatch_deletes_the_partial_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(InputError, match="sha256 is .* expected 00"):
        download(server.url, dest, sha256="00" * 32)
    assert list(tmp_path.iterdir()) == []


def test_a_file_already_there_is_checked_against_its_hash(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD[:1000])  # truncated
    with pytest.raises(InputError, match=r"file.bin: sha256 is [0-9a-f]{64}, expected [0-9a-f]{64} .*delete it"):
        download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert server.requests == [] and dest.read_bytes() == PAYLOAD[:1000]  # nothing fetched, nothing deleted
    dest.unlink()
    download(server.url, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD


def test_unreachable_server_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match=r"could not download http://127.0.0.1:9/x to .*x.bin: .*Put it there"):
        download("http://127.0.0.1:9/x", tmp_path / "x.bin", hint="Put it there yourself.")
