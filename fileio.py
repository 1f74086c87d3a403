"""
Everything that touches the disk or the network, in one place:

- InputError: the one exception for "the input is wrong" (a bad file, a failed download). Scripts print its
  message and exit; the message always says what was wrong, where, and what to do about it.
- read_text: a UTF-8 text file, or an error naming the line and byte that are not UTF-8.
- writable_dir: prove an output folder can be created and written to before any work is done.
- lock_dir: hold a folder for one writer (an OS lock that dies with its process); a second writer is an InputError.
- atomic_open: write to a temporary file, then rename, so a crash never leaves half a checkpoint or result;
  a full disk is a one-line InputError here, for every file written. write_json / read_json.
- fingerprint: a short hash of what a cached result depends on (weights, token ids, settings), for its name.
- read_cache(path, read): a cache file read with `read` (read_safetensors, read_json), or None if it is missing
  or damaged; a damaged one is deleted with a one-line warning, so the caller recomputes it.
- download: a resumable, progress-barred, optionally hash-checked HTTP download (same atomic rename);
  check_sha256 checks a file already on disk.
- read_safetensors / write_safetensors: the safetensors format, read and written by hand. It is tiny:
      [8 bytes: header length N, little-endian] [N bytes: JSON header] [raw tensor bytes]
  and, unlike pickle (torch.load), reading it can never run code from the file.
"""

import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm


class InputError(Exception):
    """A file, download or argument that the user supplied (or must supply) is missing or malformed."""


# -----------------------------------------------------------------------------
# reading text; output folders: checked, then held by one writer

def read_text(path, encoding="utf-8"):
    """The whole file as a str. Bytes that are not valid `encoding` are an InputError naming line and byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(f"{path}:{line}: byte 0x{data[e.start]:02x} (column {column}) is not valid UTF-8; "
                         f"save the file as UTF-8") from None


def writable_dir(path, flag="--out_dir"):
    """Prove `path` can hold our files before any work: create it (and missing parents) and a temporary file
    in it, then remove all of that again, so a run that fails later leaves nothing behind. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: is a file, not a directory")
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r}: cannot be created or written ({e.strerror or e})") from None
    finally:
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                pass  # never made, or someone else's files are in it now
    return path


LOCKED = set()  # the folders this process holds


@contextmanager
def lock_dir(path):
    """Hold `path` for one writer while the block runs: flock(LOCK_EX) on `path/.lock`, which holds our pid.

    The OS drops the lock when the process ends, however it ends (kill -9 included), so a lock is never stale.
    Another process that holds it is an InputError at once, naming the folder and that process. The same
    process may lock a folder it holds again (nested): the inner block just runs."""
    path = Path(path)
    if path.resolve() in LOCKED:
        yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "(pid not yet written)"
            raise InputError(f"{path}: in use by process {holder} (another run is writing this folder); "
                             f"wait for it to finish or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        LOCKED.add(path.resolve())
        try:
            yield path
        finally:
            LOCKED.discard(path.resolve())
            os.ftruncate(fd, 0)  # a .lock left behind names no process
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# atomic writes

@contextmanager
def atomic_open(path, mode="w", encoding="utf-8", newline=None, size=None):
    """Open a temporary file beside `path`; on success fsync it and rename it over `path` (atomic on POSIX).

    On any failure the temporary file is removed and `path` keeps what it held. Every file we write goes
    through here, so this is the one place a full disk (ENOSPC, or a quota: EDQUOT) becomes an InputError naming
    the folder, the bytes needed (`size`, when the caller knows it; else at least what was written) and free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, mode, encoding=None if "b" in mode else encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.stat(tmp).st_size
        os.unlink(tmp)
        if not is_disk_full(e):
            raise
        needed = f"{size:,} bytes" if size else f"more than the {written:,} bytes written"
        free = shutil.disk_usage(path.parent).free
        raise InputError(f"{path.parent}: the disk is full: writing {path.name} needed {needed}, and {free:,} "
                         f"bytes are free; nothing was changed: free some space and run again (--resume continues "
                         f"a training run from its last checkpoint)") from None


def is_disk_full(error):
    """Whether `error`, or one it was raised while handling, says the disk or quota is full (torch.save, for one,
    turns a failed write into a RuntimeError of its own)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__context__
    return False


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path):
    """A JSON file's value; a file that is not valid JSON (a truncated one, say) is an InputError naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


# -----------------------------------------------------------------------------
# caches

def fingerprint(*parts):
    """A short hash of what a cached result depends on (weights, token ids, settings)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):  # a state dict
            for name in sorted(part):
                h.update(name.encode())
                h.update(part[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, default=str).encode())
    return h.hexdigest()[:16]



def read_cache(path, read):
    """read(path) for a cache file, or None when there is none to use: none there, or a damaged one (read raised
    InputError), which is deleted with a one-line warning on stderr so the caller computes it again. Only for
    caches: a damaged checkpoint or results.json must stay an error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read(path)
    except InputError as e:
        print(f"warning: {e}; deleting it and computing it again (it is a cache)", file=sys.stderr)
        path.unlink()
        return None




# -----------------------------------------------------------------------------
# downloads

def download(url, dest, sha256=None, hint=""):
    """Fetch `url` into `dest` unless it is already there. Returns dest as a Path.

    Bytes go to `dest.part`; an interrupted download resumes from there (HTTP Range) on the next call.
    Only a complete file (and, if `sha256` is given, one with that hash) is renamed to `dest`; a `dest` that is
    already there is checked against `sha256` too.
    `hint` is appended to the error when the download fails, e.g. where to put the file by hand.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is not None:
            check_sha256(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "gpt2-sft-dpo"}
    if have:
        headers["Range"] = f"bytes={have}-"
    failed = f"could not download {url} to {dest}"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416 = nothing left past `have`: the .part file is already whole
            raise InputError(f"{failed}: HTTP {e.code} {e.reason}. {hint}".strip()) from None
        response = None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"{failed}: {reason}. {hint}".strip()) from None
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored our Range header: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            try:
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=None,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise InputError(f"{failed}: interrupted ({e}); run again to resume from {part}") from None
        if total is not None and part.stat().st_size != total:
            raise InputError(f"{failed}: got {part.stat().st_size} of {total} bytes; run again to resume")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise InputError(f"{failed}: sha256 is {actual}, expected {sha256}; the partial file was deleted")
    os.replace(part, dest)
    return dest


def check_sha256(path, expected):
    """An InputError unless the file at `path` has this sha256: a truncated or wrong file is never used."""
    actual = sha256_of(path)
    if actual != expected:
        raise InputError(f"{path}: sha256 is {actual}, expected {expected} (truncated, or not the right file); "
                         f"delete it and run again to download it afresh")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit on the JSON header
assert sys.byteorder == "little", "safetensors stores little-endian bytes; this reader does not byte-swap"


def read_safetensors(path):
    """Read every tensor of a .safetensors file. Returns (tensors: dict name -> Tensor, metadata: dict).

    Any inconsistency (truncated file, garbage header, offsets that do not match the shapes) raises
    InputError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size

    def bad(problem):
        return InputError(f"{path}: not a valid safetensors file: {problem}")

    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"the file is only {size} bytes long: truncated (an interrupted download?)")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header claims {header_len} bytes but the file has {size} (truncated, or another format)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + header_len, size - 8 - header_len

        # Tensors must tile the data region exactly: this is what catches a truncated download.
        entries = []
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(n) for n in info["shape"]]
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
            numel = 1
            for n in shape:
                numel *= n
            if end - begin != numel * dtype.itemsize:
                raise bad(f"tensor {name!r} has shape {shape} ({info['dtype']}) but {end - begin} bytes")
            entries.append((begin, end, name, dtype, shape))
        entries.sort()
        expected_begin = 0
        for begin, end, name, _, _ in entries:
            if begin != expected_begin:
                raise bad(f"tensor {name!r} starts at byte {begin}, expected {expected_begin}")
            expected_begin = end
        if expected_begin != data_size:
            raise bad(f"the tensors need {expected_begin} bytes of data but the file holds {data_size} "
                      f"(truncated or corrupted; delete it and download again)")

        tensors = {}
        for begin, end, name, dtype, shape in entries:
            f.seek(data_start + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)  # straight into the tensor's memory: one copy, not two
            tensors[name] = (torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype))
            tensors[name] = tensors[name].reshape(shape)
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Write a dict of tensors (and optional str -> str metadata) as a .safetensors file, atomically."""
    names_to_dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names_to_dtype[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the spec pads the header to a multiple of 8 with spaces
    with atomic_open(path, "wb", size=8 + len(header_bytes) + offset) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
