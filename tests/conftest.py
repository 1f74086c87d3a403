"""Shared test set-up: the project root on sys.path, offline tokenizer files, the data (the project's own samples,
and the course's real files where present), tiny models, and an HTTP server on this machine for the download tests."""

import http.server
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "data" / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# tiktoken downloads GPT-2's BPE on first use; a ../shared folder, where there is one, holds its cache, so tests
# run offline. Elsewhere set TIKTOKEN_CACHE_DIR, or let tiktoken download it once.
if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))

from data.download import SONNET_FILES  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def sample_data():
    """data/samples: the project's own small files in the course's formats (see its README.md)."""
    return SAMPLE_DATA


def course_data_dir():
    """The first folder holding the course's real sonnet files (each with the sha256 data.download pins):
    $CS224N_DATA_DIR, then data/ (where `python -m data.download` puts them), then ../shared/data. None if none."""
    import hashlib
    candidates = [os.environ.get("CS224N_DATA_DIR"), ROOT / "data", SHARED_DATA]
    for directory in [Path(c) for c in candidates if c]:
        if all((directory / name).is_file() and hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha
               for name, sha in SONNET_FILES.items()):
            return directory
    return None


@pytest.fixture
def course_data():
    """A folder with the course's real sonnet files, for the tests that check something of those very files;
    they skip where there is none."""
    directory = course_data_dir()
    if directory is None:
        pytest.skip("the course's sonnet files are not here (run `python -m data.download`, or set CS224N_DATA_DIR "
                    "to a folder holding them)")
    return directory


@pytest.fixture
def tokenizer():
    from data.tokenizer import get_tokenizer
    return get_tokenizer()


def tiny_config(**overrides):
    """2 layers, 64 wide, GPT-2's full vocabulary: fast on a CPU, real in every other respect."""
    return GPTConfig(**{**dict(block_size=128, vocab_size=50257, n_layer=2, n_head=4, n_embd=64), **overrides})


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """A randomly initialised GPT-2 saved by Hugging Face transformers in the hub's layout
    (config.json + model.safetensors): the reference for weight loading. Returns (directory, hf_model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hub_gpt2")
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory, hf_model


def always_predict(model, token):
    """Rig a model so that `token` is the most likely next token everywhere: every final hidden state becomes
    the all-ones vector, and only `token`'s output row is large (logit n_embd; the others are about 0)."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[token] = 1.0
    return model


class LocalFileServer:
    """Serves `payload` on 127.0.0.1 at any path. Honours "Range: bytes=N-", can break off after `cut` bytes
    once (an interrupted download), and records each request's start offset in `requests`."""

    def __init__(self):
        self.payload, self.cut, self.requests = b"", None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                server.requests.append(start)
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut is not None:
                    body, server.cut = body[:server.cut], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"


@pytest.fixture
def file_server():
    server = LocalFileServer()
    threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.httpd.shutdown()
