"""The base-spectrum cache: hits and misses, equality to a fresh SVD (numpy as the independent
reference), content keys, float32/float64 kept apart, damaged entries rebuilt with a warning,
atomic writes, and ``lora-audit cache ls|clear``. Forgery, the key file and what ls/clear may
touch: test_cache_trust.py."""

import json
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lora_audit.cli import cli
from lora_audit.spectral.cache import CacheWarning, SpectrumCache, tensor_key


def _matrix(m=40, n=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)


def _assert_is_svd_of(spec, W, tol):
    """Against numpy's SVD: same singular values, same singular subspaces (vectors up to sign)."""
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(spec.S.double().numpy(), S, atol=tol * S[0])
    np.testing.assert_allclose(np.abs(np.sum(spec.U.double().numpy() * U, axis=0)), 1.0, atol=tol * 100)
    np.testing.assert_allclose(np.abs(np.sum(spec.Vh.double().numpy() * Vh, axis=1)), 1.0, atol=tol * 100)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_miss_then_hit_equals_fresh_svd(tmp_path, shape):
    W = _matrix(*shape)
    cache = SpectrumCache(tmp_path / "spectra")
    first = cache.base_spectrum(W, "cpu")
    cache.flush()
    assert (cache.hits, cache.misses) == (0, 1)
    assert len(list((tmp_path / "spectra").glob("*.safetensors"))) == 1
    again = SpectrumCache(tmp_path / "spectra").base_spectrum(W.clone(), "cpu")  # a new process, same values
    for a, b in ((first.U, again.U), (first.S, again.S), (first.Vh, again.Vh)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    _assert_is_svd_of(again, W, 1e-5)
    assert again.key == first.key == tensor_key(W)


def test_key_is_the_content():
    W = _matrix()
    assert tensor_key(W) == tensor_key(W.clone())
    assert tensor_key(W) == tensor_key(W.T.contiguous().T)  # a strided view of the same values
    W2 = W.clone()
    W2[3, 4] = torch.nextafter(W2[3, 4], torch.tensor(1e9))  # one ulp apart
    assert tensor_key(W2) != tensor_key(W)
    assert tensor_key(W.reshape(30, 40)) != tensor_key(W)  # same bytes, other shape
    assert tensor_key(W.double()) != tensor_key(W)


def test_float64_and_float32_are_separate_entries(tmp_path):
    W = _matrix()
    cache = SpectrumCache(tmp_path)
    s32 = cache.base_spectrum(W, "cpu")
    s64 = cache.base_spectrum(W.double(), "cpu")
    cache.flush()
    assert cache.misses == 2 and len(cache.entries()) == 2
    assert {e.dtype for e in cache.entries()} == {"float32", "float64"}
    hit64 = SpectrumCache(tmp_path).base_spectrum(W.double(), "cpu")
    assert hit64.U.dtype == torch.float64 and torch.equal(hit64.U, s64.U)
    _assert_is_svd_of(hit64, W, 1e-12)  # float64 accuracy: not a float32 spectrum upcast
    assert s32.U.dtype == torch.float32


def _entry(tmp_path):
    W = _matrix()
    cache = SpectrumCache(tmp_path)
    fresh = cache.base_spectrum(W, "cpu")
    cache.flush()
    (path,) = tmp_path.glob("*.safetensors")
    return W, fresh, path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))


def _flip_header_byte(path):
    data = bytearray(path.read_bytes())
    data[12] ^= 0x7F
    path.write_bytes(bytes(data))


def _wrong_metadata(path):
    """A well-formed safetensors file whose metadata names another shape (payload consistent)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["shape"] = "[30, 40]"
    save_file(tensors, str(path), metadata=meta)


def _wrong_tensor(path):
    """Consistent metadata and checksum field copied, but a tensor of the wrong shape."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["S"] = tensors["S"][:-1].clone()
    save_file(tensors, str(path), metadata=meta)


def _swap_payload(path):
    """Valid file, valid metadata for this key, but the values of another matrix's spectrum."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["S"] = tensors["S"] * 2
    save_file(tensors, str(path), metadata=meta)


def _empty(path):
    path.write_bytes(b"")


def _pickle_instead(path):
    path.write_bytes(b"\x80\x04\x95" + os.urandom(64))


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _flip_header_byte, _wrong_metadata, _wrong_tensor,
                                    _swap_payload, _empty, _pickle_instead])
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, damage):
    W, fresh, path = _entry(tmp_path)
    damage(path)
    cache = SpectrumCache(tmp_path)
    with pytest.warns(CacheWarning, match="corrupt"):
        got = cache.base_spectrum(W, "cpu")
    cache.flush()
    assert (cache.hits, cache.misses, cache.rebuilt) == (0, 1, 1)
    assert torch.equal(got.U, fresh.U) and torch.equal(got.S, fresh.S) and torch.equal(got.Vh, fresh.Vh)
    # the rebuilt entry is good again: the next reader hits without a warning
    again = SpectrumCache(tmp_path)
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        again.base_spectrum(W, "cpu")
    assert again.hits == 1


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A crash in the middle of writing (here: fsync fails) leaves no entry and no temporary file;
    called directly it raises, in the background writer it is a warning and the SVD is still
    returned."""
    W = _matrix()
    cache = SpectrumCache(tmp_path)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.warns(CacheWarning, match="could not write .*disk full"):
        spec = cache.base_spectrum(W, "cpu")  # the writer thread may warn at once
        cache.flush()
    assert cache.write_errors == 1 and list(tmp_path.iterdir()) == []
    _assert_is_svd_of(spec, W, 1e-5)
    with pytest.raises(OSError, match="disk full"):
        cache.store(spec.key, W, spec)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    cache.base_spectrum(W, "cpu")
    cache.flush()
    assert cache.misses == 2 and len(cache.entries()) == 1


def test_leftover_temporary_file_is_not_an_entry(tmp_path):
    W = _matrix()
    key = tensor_key(W)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.safetensors.", suffix=".tmp", dir=tmp_path)  # as the writer does
    os.write(fd, b"\x00" * 100)  # ... and a killed writer leaves
    os.close(fd)
    cache = SpectrumCache(tmp_path)
    assert cache.entries() == []
    cache.base_spectrum(W, "cpu")
    cache.flush()
    assert cache.misses == 1
    entry_size = cache.path_for(key).stat().st_size
    assert cache.clear() == (2, 100 + entry_size)
    assert list(tmp_path.iterdir()) == []


def test_entries_and_clear(tmp_path):
    cache = SpectrumCache(tmp_path / "c")
    assert cache.entries() == [] and cache.clear() == (0, 0)
    cache.base_spectrum(_matrix(40, 30), "cpu")
    cache.base_spectrum(_matrix(8, 8, seed=2), "cpu")
    cache.flush()
    (tmp_path / "c" / "README.txt").write_text("not ours")
    entries = cache.entries()
    assert sorted(e.shape for e in entries) == [(8, 8), (40, 30)]
    # U (40, 30) + S (30,) + Vh (30, 30) float32 = 8520 bytes of payload plus a header
    big = [e for e in entries if e.shape == (40, 30)][0]
    assert 4 * (40 * 30 + 30 + 30 * 30) < big.size < 4 * (40 * 30 + 30 + 30 * 30) + 2000
    assert big.size == big.path.stat().st_size
    total = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))
    assert cache.total_bytes() == total
    assert cache.clear() == (2, total)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["README.txt"]


def _populate(root):
    cache = SpectrumCache(root)
    cache.base_spectrum(_matrix(40, 30), "cpu")
    cache.base_spectrum(_matrix(30, 40, seed=1).double(), "cpu")
    cache.flush()
    return cache


def test_cache_ls_cli(tmp_path):
    root = tmp_path / "spectra"
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root)])
    assert r.exit_code == 0 and r.output == f"No cached spectra in {root}\n"
    cache = _populate(root)
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["KEY", "SHAPE", "DTYPE", "SIZE", "CREATED"]
    assert "40x30" in r.output and "30x40" in r.output and "float64" in r.output
    assert lines[-1].startswith("2 entries, ") and lines[-1].endswith(f" in {root}")
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root), "--json", "-"])
    data = json.loads(r.stdout)
    assert list(data)[0] == "lora_audit" and data["lora_audit"]["schema"] == "cache-listing"
    assert data["count"] == 2 and data["root"] == str(root) and data["ignored_files"] == 0
    assert data["total_bytes"] == sum(p.stat().st_size for p in root.glob("*.safetensors"))
    assert {e["key"] for e in data["entries"]} == {e.key for e in cache.entries()}
    assert {tuple(e["shape"]) for e in data["entries"]} == {(40, 30), (30, 40)}


def test_cache_ls_default_folder_follows_lora_audit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CACHE", str(tmp_path))
    _populate(tmp_path / "spectra")
    r = CliRunner().invoke(cli, ["cache", "ls", "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["count"] == 2


def test_cache_clear_cli(tmp_path):
    root = tmp_path / "spectra"
    _populate(root)
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(root)], input="n\n")
    assert r.exit_code == 1 and "Aborted" in r.output
    assert len(list(root.glob("*.safetensors"))) == 2
    total = sum(p.stat().st_size for p in root.glob("*.safetensors"))
    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(root)], input="y\n")
    assert r.exit_code == 0 and "Delete 2 cached spectra" in r.output
    assert r.output.rstrip().endswith(f"Removed 2 files ({total / 1024:.1f} KiB) from {root}")
    assert list(root.glob("*.safetensors")) == []
    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(root), "--yes"])
    assert r.exit_code == 0 and r.output == f"No cached spectra in {root}\n"


def test_cache_dir_that_is_a_file_is_a_clean_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(cli, ["cache", "ls", "--cache-dir", str(f)])
    assert r.exit_code != 0 and "Traceback" not in r.output


@pytest.mark.parametrize("data", [struct.pack("<Q", 2**40), struct.pack("<Q", 20000) + b"[" * 20000])
def test_header_reader_rejects_non_safetensors(tmp_path, data):
    from lora_audit.cache import read_header

    p = tmp_path / "x"
    p.write_bytes(data)
    with pytest.raises(ValueError):
        read_header(p)


def test_audit_with_cache_equals_audit_without(tmp_path):
    """Engine + real cache: a second run hits for every matrix and gives identical results."""
    from lora_audit.checkpoints.deltas import LowRank, MatrixGroup
    from lora_audit.spectral.engine import audit

    g = torch.Generator().manual_seed(5)
    groups = [MatrixGroup(f"model.layers.{i}.self_attn.q_proj.weight", torch.randn(24, 20, generator=g),
                          [LowRank(torch.randn(24, 2, generator=g), torch.randn(2, 20, generator=g), 3.0)])
              for i in range(3)]
    plain = audit(groups, device="cpu", progress=False)
    cold = SpectrumCache(tmp_path)
    r1 = audit(groups, device="cpu", progress=False, cache=cold)
    warm = SpectrumCache(tmp_path)
    r2 = audit(groups, device="cpu", progress=False, cache=warm)
    assert (cold.misses, warm.hits, warm.misses) == (3, 3, 0)
    for r in (r1, r2):
        assert [m.max_cos for m in r.results[0].matrices] == [m.max_cos for m in plain.results[0].matrices]
        assert r.settings["cache"] == str(tmp_path)


def test_entries_are_aligned_and_misaligned_ones_still_read(tmp_path):
    """New entries put every tensor at a 64-byte boundary (mapped reads then give the same BLAS
    results as fresh arrays); an entry written without that padding is still read correctly."""
    from lora_audit.cache import read_header

    W = _matrix(48, 32)
    cache = SpectrumCache(tmp_path)
    spec = cache.base_spectrum(W, "cpu")
    cache.flush()
    path = cache.path_for(spec.key)
    start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert start % 64 == 0
    # rewrite the same entry with plain safetensors (payload at whatever offset it lands on; the
    # "pad" field is the one metadata field outside the MAC)
    from safetensors.torch import save

    meta = read_header(path).pop("__metadata__")
    meta["pad"] = ""
    tensors = {"U": spec.U.contiguous(), "S": spec.S, "Vh": spec.Vh.contiguous()}
    data = save(tensors, metadata=meta)
    while (8 + struct.unpack("<Q", data[:8])[0]) % 64 == 0:  # make sure it is misaligned
        meta["pad"] += " "
        data = save(tensors, metadata=meta)
    path.write_bytes(data)
    again = SpectrumCache(tmp_path)
    got = again.base_spectrum(W, "cpu")
    assert again.hits == 1 and again.rebuilt == 0
    for a, b in ((spec.U, got.U), (spec.S, got.S), (spec.Vh, got.Vh)):
        assert torch.equal(a, b)


def test_warm_run_projects_lora_factors_in_the_reader_thread(tmp_path, monkeypatch):
    """With the base cached, the reader thread projects each LoRA delta onto the cached spectrum
    (the main thread does not project again), and the result equals an audit without the cache."""
    import threading

    from lora_audit.checkpoints.deltas import LowRank, MatrixGroup
    from lora_audit.spectral import lowrank
    from lora_audit.spectral.engine import audit

    g = torch.Generator().manual_seed(6)
    groups = [MatrixGroup(f"model.layers.{i}.self_attn.v_proj.weight", torch.randn(24, 20, generator=g),
                          [LowRank(torch.randn(24, 2, generator=g), torch.randn(2, 20, generator=g), 3.0)])
              for i in range(3)]
    plain = audit(groups, device="cpu", progress=False)
    audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))
    threads = []
    real = lowrank.project

    def spy(base, delta):
        threads.append(threading.current_thread().name)
        return real(base, delta)

    monkeypatch.setattr(lowrank, "project", spy)
    warm = audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))
    assert threads == ["lora-audit-reader"] * 3
    assert [m.max_cos for m in warm.results[0].matrices] == [m.max_cos for m in plain.results[0].matrices]


def test_a_cached_audit_writes_the_verification_memo_and_clear_removes_it(tmp_path, monkeypatch):
    import lora_audit.cache as store

    monkeypatch.setattr(store, "MEMO_MARGIN_NS", 0)  # entries this young are not remembered by default
    root = tmp_path / "spectra"
    _populate(root)
    cache = SpectrumCache(root)
    first = cache.base_spectrum(_matrix(40, 30), "cpu")  # a hit, verified in full and remembered
    cache.flush()
    memo = root / "lora-audit-spectrum.verified.json"
    assert memo.is_file() and cache.scan().memo == memo and cache.scan().ignored == 0
    again = SpectrumCache(root)
    second = again.base_spectrum(_matrix(40, 30), "cpu")
    assert again.entry_store.memo_hits == 1 and torch.equal(first.U, second.U) and torch.equal(first.S, second.S)
    for p in root.glob("*.safetensors"):  # a folder left with the memo alone is cleared too
        p.unlink()
    r = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(root), "--yes"])
    assert r.exit_code == 0 and "Removed 1 files" in r.output and not memo.exists()
