"""
Everything that touches the disk or the network. InputError is the one exception for "the input is wrong" (a bad
file, a failed download): its message says what was wrong, where, and what to do about it. Every file is written
through atomic_open, the one place where a full disk becomes one line. The safetensors format is written by hand:
[8 bytes: header length N, little-endian] [N bytes: JSON header] [raw tensor bytes]; unlike pickle (torch.load),
reading it never runs code from the file.
"""

import errno
import fcntl
import hashlib
import http.client
import json
import math
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from tqdm import tqdm


class InputError(Exception):
    """A file, download or argument that the user supplied (or must supply) is missing or malformed."""


# -----------------------------------------------------------------------------
# reading files; output folders: checked, then held by one writer

def read_text(path):
    """The whole file as a str. Bytes that are not UTF-8 are an InputError naming the line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise InputError(f"{path}:{line}: byte 0x{data[e.start]:02x} (column {column}) is not valid UTF-8; "
                         f"save the file as UTF-8") from None


def read_json(path):
    """A JSON file's value; a file that is not valid JSON (a truncated one, say) is an InputError naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def writable_dir(path, flag="--out_dir"):
    """Prove `path` can hold our files before any work: create it (and missing parents) and a temporary file
    in it, then remove all of that again, so a run that fails later leaves nothing behind. Returns the path.
    Under torchrun only rank 0 checks: processes making and removing one folder at once would fail each other."""
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        return path
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: is a file, not a directory")
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r}: cannot be created or written ({e.strerror or e})") from None
    finally:
        for directory in created:
            with suppress(OSError):  # never made, or someone else's files are in it now
                directory.rmdir()
    return path


LOCKED = set()  # the folders this process holds


@contextmanager
def lock_dir(path):
    """Hold `path` for one writer: flock on `path/.lock`, which holds our pid. The OS drops the lock when the
    process ends (kill -9 too), so it is never stale; another holder is an InputError; nesting just runs."""
    path = Path(path)
    if path.resolve() in LOCKED:
        yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(f"{path}: in use by process {f.read().strip() or '?'} (another run is writing this "
                             f"folder); wait for it to finish or use another folder") from None
        f.truncate(0)
        print(os.getpid(), file=f, flush=True)
        LOCKED.add(path.resolve())
        try:
            yield path
        finally:
            LOCKED.discard(path.resolve())
            f.truncate(0)  # a .lock left behind names no process


# -----------------------------------------------------------------------------
# atomic writes

@contextmanager
def atomic_open(path, mode="w", newline=None, size=None):
    """A temporary file beside `path`, fsynced and renamed over it on success; on failure `path` is untouched.
    A full disk or quota is an InputError naming the bytes needed (`size`, or more than those written) and free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.stat(tmp).st_size
        os.unlink(tmp)
        while e is not None and getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
            e = e.__context__  # torch.save, for one, raises its own RuntimeError while handling the OSError
        if e is None:
            raise
        needed = f"{size:,} bytes" if size else f"more than the {written:,} bytes written"
        raise InputError(f"{path.parent}: the disk is full: writing {path.name} needed {needed}, and "
                         f"{shutil.disk_usage(path.parent).free:,} bytes are free; nothing was changed: free some "
                         f"space and run again (--resume continues a training run from its last checkpoint)") from None


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


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
    """read(path), or None when there is none, or it is damaged (read raised InputError): then it is deleted with
    a one-line warning and the caller computes it again. Only for caches: a damaged results.json is an error."""
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
    """Fetch `url` into `dest` unless it is there (then only check its sha256). Bytes go to `dest.part`, which the
    next call resumes (HTTP Range); only a whole file with the right sha256 becomes `dest`. `hint` ends an error."""
    dest = Path(dest)
    if dest.exists():
        if sha256 is not None:
            check_sha256(dest, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    failed = f"could not download {url} to {dest}"
    request = urllib.request.Request(url, headers={"User-Agent": "gpt2-sft-dpo", "Range": f"bytes={have}-"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            have = have if response.status == 206 else 0  # 200: the server ignored our Range, so start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with (open(part, "ab" if have else "wb") as f,
                  tqdm.wrapattr(f, "write", total=total, initial=have, desc=dest.name, disable=None) as out):
                shutil.copyfileobj(response, out, 1 << 20)
        if total is not None and part.stat().st_size != total:
            raise InputError(f"{failed}: got {part.stat().st_size} of {total} bytes; run again to resume")
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416 = nothing left past `have`: the .part file is already whole
            raise InputError(f"{failed}: HTTP {e.code} {e.reason}. {hint}".strip()) from None
    except (OSError, http.client.HTTPException) as e:  # refused, timed out (URLError), or cut off
        raise InputError(f"{failed}: {getattr(e, 'reason', e)}; run again to resume. {hint}".strip()) from None
    if sha256 is not None:
        check_sha256(part, sha256, delete=True)
    os.replace(part, dest)
    return dest


def check_sha256(path, expected, delete=False):
    """An InputError unless the file at `path` has this sha256 (`delete`: delete it first, as a bad download is)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected:
        if delete:
            os.unlink(path)
        raise InputError(f"{path}: sha256 is {h.hexdigest()}, expected {expected} (truncated, or not the right "
                         f"file); {'it was deleted:' if delete else 'delete it and'} run again to download it afresh")


# -----------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit on the JSON header
assert sys.byteorder == "little", "safetensors stores little-endian bytes; this reader does not byte-swap"


def read_safetensors(path):
    """(tensors: dict name -> Tensor, metadata: dict). A truncated file, a garbage header or offsets that do not
    tile the data exactly by the shapes is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size

    def bad(problem):
        return InputError(f"{path}: not a valid safetensors file: {problem}")

    if size < 8:
        raise bad(f"the file is only {size} bytes long: truncated (an interrupted download?)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"its header claims {header_len} bytes but the file has {size} (truncated, or another format)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # not UTF-8, or not JSON
            raise bad(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        try:
            entries = sorted((int(info["data_offsets"][0]), int(info["data_offsets"][1]), name,
                              SAFETENSORS_DTYPES[info["dtype"]], [int(n) for n in info["shape"]])
                             for name, info in header.items())
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise bad(f"a tensor's entry is malformed ({e!r})") from None
        tensors, offset = {}, 0  # the tensors must tile the data region exactly, in order
        for begin, end, name, dtype, shape in entries:
            needed = math.prod(shape) * dtype.itemsize
            if (begin, end) != (offset, offset + needed):
                raise bad(f"tensor {name!r} has bytes {begin}..{end}; shape {shape} needs {offset}..{offset + needed}")
            tensors[name] = torch.empty(shape, dtype=dtype)
            f.readinto(tensors[name].reshape(-1).view(torch.uint8).numpy())  # straight into the tensor's memory
            offset = end
    if offset != size - 8 - header_len:
        raise bad(f"the tensors need {offset} bytes of data but the file holds {size - 8 - header_len} "
                  f"(truncated or corrupted; delete it and download again)")
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Write a dict of tensors (and optional str -> str metadata) as a .safetensors file, atomically."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        blob = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
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
