"""The spectrum cache's trust model: entries authenticated with a secret key (forged, renamed,
swapped and older-format entries are rebuilt, never used), the key file (created 0600 and
race-free, refused when others may read it or it is not 32 bytes, LORA_AUDIT_CACHE_KEY_FILE),
and ``cache ls|clear`` touching only files that are provably cache entries."""

import hashlib
import hmac
import json
import os
import stat
import threading
import warnings
import zlib

import blake3
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from lora_audit.cli import cli
from lora_audit.commands.cache import human_bytes
from lora_audit.errors import InputError
from lora_audit.cache import key_file, load_secret
from lora_audit.spectral.cache import CacheWarning, SpectrumCache, tensor_key


_BAD_MAC = "MAC does not verify"


def _matrix(m=40, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64).float()


def _entry(root, W):
    cache = SpectrumCache(root)
    spec = cache.base_spectrum(W, "cpu")
    cache.flush()
    return spec, cache.path_for(spec.key)


def _load(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _payload(tensors):
    return b"".join(tensors[k].contiguous().numpy().tobytes() for k in ("U", "S", "Vh"))


def _rebuilt_from_scratch(root, W, match):
    """Look W up in a new cache object: the entry must be refused with a warning matching ``match``
    and the spectrum recomputed (numpy's singular values as the reference); then the rebuilt entry
    is a plain hit."""
    cache = SpectrumCache(root)
    with pytest.warns(CacheWarning, match=match):
        got = cache.base_spectrum(W, "cpu")
    cache.flush()
    assert (cache.hits, cache.misses, cache.rebuilt) == (0, 1, 1)
    np.testing.assert_allclose(got.S.numpy(), np.linalg.svd(W.double().numpy(), compute_uv=False), rtol=1e-5)
    again = SpectrumCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hit = again.base_spectrum(W, "cpu")
    assert again.hits == 1 and torch.equal(hit.S, got.S)
    return got


# ---- forged, renamed, stale entries -------------------------------------------------------------
def test_forged_payload_with_recomputed_crc_is_rejected(tmp_path):
    """The attack a CRC-only cache allowed: change the spectrum, recompute the checksum. Written as
    a format-1 entry (CRC-32) or format-2 entry (HMAC-SHA256) it is an old entry, rebuilt; written as
    the current format with the CRC, or with a MAC under a guessed key, it fails the MAC."""
    W = _matrix()
    _, path = _entry(tmp_path, W)
    meta, t = _load(path)
    t["S"] = t["S"] * 3  # every singular value tripled: the audit's intruder search changes
    forgeries = [
        {**meta, "version": "1", "checksum": f"crc32:{zlib.crc32(_payload(t)):08x}"},
        {**meta, "version": "2", "mac": "hmac-sha256:" + hmac.new(b"\0" * 32, _payload(t), hashlib.sha256).hexdigest()},
        {**meta, "checksum": f"crc32:{zlib.crc32(_payload(t)):08x}"},
        {**meta, "mac": "hmac-sha256:" + hmac.new(b"\0" * 32, _payload(t), hashlib.sha256).hexdigest()},
        {**meta, "mac": "blake3-keyed:" + blake3.blake3(_payload(t), key=b"\0" * 32).hexdigest()},
    ]
    for forged, match in zip(forgeries, ["older lora-audit", "older lora-audit"] + [_BAD_MAC] * 3, strict=True):
        save_file(t, str(path), metadata=forged)
        _rebuilt_from_scratch(tmp_path, W, match)


def test_entry_written_under_another_key_file_is_rejected(tmp_path, monkeypatch):
    """An attacker who can write the cache but not read the key file makes a perfectly formed
    entry with their own key (here: lora-audit itself with another key file), holding the spectrum
    of another matrix: refused."""
    W, other = _matrix(), _matrix(seed=7)
    attacker_key = tmp_path / "attacker-key"
    attacker_key.write_bytes(os.urandom(32))
    attacker_key.chmod(0o600)
    monkeypatch.setenv("LORA_AUDIT_CACHE_KEY_FILE", str(attacker_key))
    wrong = SpectrumCache(tmp_path / "c").base_spectrum(other, "cpu")
    SpectrumCache(tmp_path / "c").store(tensor_key(W), W, wrong)
    monkeypatch.delenv("LORA_AUDIT_CACHE_KEY_FILE")
    _rebuilt_from_scratch(tmp_path / "c", W, _BAD_MAC)


def test_entry_renamed_to_another_key_is_rejected(tmp_path):
    """One matrix's entry copied to another matrix's file name: refused by its metadata, and when
    the metadata is edited to name the new key too, by the MAC (it binds the key)."""
    W, W2 = _matrix(), _matrix(seed=3)
    _, path = _entry(tmp_path, W)
    target = tmp_path / f"{tensor_key(W2)}.safetensors"
    target.write_bytes(path.read_bytes())
    _rebuilt_from_scratch(tmp_path, W2, "metadata does not match")
    meta, t = _load(path)
    save_file(t, str(target), metadata={**meta, "key": tensor_key(W2)})
    _rebuilt_from_scratch(tmp_path, W2, _BAD_MAC)


def _write_version_1(path, key, tensors):
    """An entry as the CRC-32 format (version 1) wrote it."""
    meta = {"format": "lora-audit-spectrum", "version": "1", "key": key, "dtype": "float32",
            "shape": json.dumps([int(tensors["U"].shape[0]), int(tensors["Vh"].shape[1])]),
            "checksum": f"crc32:{zlib.crc32(_payload(tensors)):08x}"}
    save_file(tensors, str(path), metadata=meta)


def _write_version_2(path, key, tensors, secret):
    """An entry as the HMAC-SHA256 format (version 2) wrote it, under the right key file."""
    shape = [int(tensors["U"].shape[0]), int(tensors["Vh"].shape[1])]
    ident = json.dumps(["lora-audit-spectrum", "2", key, "float32", shape]).encode() + b"\0"
    meta = {"format": "lora-audit-spectrum", "version": "2", "key": key, "dtype": "float32",
            "shape": json.dumps(shape), "mac": "hmac-sha256:" + hmac.new(secret, ident + _payload(tensors),
                                                                          hashlib.sha256).hexdigest()}
    save_file(tensors, str(path), metadata=meta)


_OLD = "format version {}: not used by this lora-audit (`lora-audit cache clear` removes it)"


@pytest.mark.parametrize("version", ["1", "2"])
def test_older_format_entry_is_rebuilt_not_trusted(tmp_path, version):
    """Entries of formats 1 (CRC-32) and 2 (HMAC-SHA256, valid under this key file) at the current
    key's file name: listed as not used, rebuilt on use, never trusted."""
    W = _matrix()
    spec, path = _entry(tmp_path, W)
    tensors = {"U": spec.U, "S": spec.S, "Vh": spec.Vh}
    if version == "1":
        _write_version_1(path, spec.key, tensors)
    else:
        _write_version_2(path, spec.key, tensors, key_file().read_bytes())
    (entry,) = SpectrumCache(tmp_path).entries()
    assert (entry.version, entry.ok, entry.problem) == (version, False, _OLD.format(version))
    _rebuilt_from_scratch(tmp_path, W, rf"older lora-audit \(format version {version}")
    assert _load(path)[0]["version"] == "3"


def test_mac_is_keyed_blake3_over_identity_fields_and_tensors(tmp_path):
    """The stored MAC and key against ones computed here from the documented definitions (the
    blake3 package directly) and the key file."""
    W = _matrix(24, 36)
    spec, path = _entry(tmp_path, W)
    meta, t = _load(path)
    msg = json.dumps(["lora-audit-spectrum", "3", spec.key, {"dtype": "float32", "shape": "[24, 36]"}]).encode()
    msg += b"\0"
    for name in ("S", "U", "Vh"):  # name order
        msg += json.dumps([name, "float32", list(t[name].shape)]).encode() + b"\0"
        msg += t[name].contiguous().numpy().tobytes()
    assert meta["mac"] == "blake3-keyed:" + blake3.blake3(msg, key=key_file().read_bytes()).hexdigest()
    raw = W.numpy().tobytes()
    want_key = blake3.blake3(b"lora-audit-spectrum/2\0" + f"Ttorch.float32|[24, 36]|{len(raw)}\0".encode() + raw)
    assert spec.key == want_key.hexdigest() == path.stem


# ---- the key file -------------------------------------------------------------------------------
def test_key_file_is_created_private_in_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(tmp_path / "config"))
    _entry(tmp_path / "c", _matrix())
    path = tmp_path / "config" / "cache-key"
    assert key_file() == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert not any(p.name == "cache-key" for p in (tmp_path / "c").iterdir())
    assert load_secret() == path.read_bytes()  # the same key next time


def test_config_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_AUDIT_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert key_file() == tmp_path / "lora-audit" / "cache-key"


def test_concurrent_first_use_agrees_on_one_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(tmp_path / "config"))
    got, start = [], threading.Barrier(8)

    def first_use():
        start.wait()
        got.append(load_secret())

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert [p.name for p in (tmp_path / "config").iterdir()] == ["cache-key"]  # no temporary file left


def _audit_with_cache(root):
    from lora_audit.checkpoints.deltas import LowRank, MatrixGroup
    from lora_audit.spectral.engine import audit

    g = torch.Generator().manual_seed(1)
    group = MatrixGroup("q.weight", torch.randn(12, 10, generator=g),
                        [LowRank(torch.randn(12, 2, generator=g), torch.randn(2, 10, generator=g), 1.0)])
    return audit([group], device="cpu", progress=False, cache=SpectrumCache(root))


def test_group_readable_key_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(tmp_path / "config"))
    path = tmp_path / "config" / "cache-key"
    load_secret()
    path.chmod(0o640)
    with pytest.raises(InputError, match=rf"may be accessed by other users \(mode 0640\).*chmod 600 {path}"):
        _audit_with_cache(tmp_path / "c")  # raised by the engine's reader thread, as the user's error
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad, match", [
    (lambda p: p.write_bytes(b"x" * 31), "exactly 32 bytes, it holds 31"),
    (lambda p: p.write_bytes(b"x" * 64), "exactly 32 bytes, it holds 64"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: os.mkfifo(p), "not a regular file"),  # and opening it does not block
])
def test_unusable_key_file_is_refused(tmp_path, monkeypatch, bad, match):
    path = tmp_path / "key"
    bad(path)
    if path.is_file():
        path.chmod(0o600)
    monkeypatch.setenv("LORA_AUDIT_CACHE_KEY_FILE", str(path))
    with pytest.raises(InputError, match=match):
        SpectrumCache(tmp_path / "c").lookup(_matrix())


def test_key_file_named_by_the_environment(tmp_path, monkeypatch):
    """LORA_AUDIT_CACHE_KEY_FILE: used as given (two machines with the same key file read each
    other's entries); the default key file is not created; a missing one is an error, not a new
    key."""
    shared = tmp_path / "team-key"
    shared.write_bytes(os.urandom(32))
    shared.chmod(0o600)
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("LORA_AUDIT_CACHE_KEY_FILE", str(shared))
    W = _matrix()
    _entry(tmp_path / "c", W)
    assert SpectrumCache(tmp_path / "c").secret() == shared.read_bytes()
    other_machine = SpectrumCache(tmp_path / "c")
    other_machine.base_spectrum(W, "cpu")
    assert other_machine.hits == 1 and not (tmp_path / "config").exists()
    monkeypatch.setenv("LORA_AUDIT_CACHE_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="LORA_AUDIT_CACHE_KEY_FILE=.*missing: no such file. Copy your team's"):
        SpectrumCache(tmp_path / "c").lookup(W)
    assert not (tmp_path / "missing").exists()


def test_listing_and_clearing_need_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CONFIG", str(tmp_path / "config"))
    _entry(tmp_path / "c", _matrix())
    (tmp_path / "config" / "cache-key").chmod(0o644)
    assert len(SpectrumCache(tmp_path / "c").entries()) == 1
    assert SpectrumCache(tmp_path / "c").clear()[0] == 1


# ---- ls and clear touch only the cache's own files -----------------------------------------------
def _model_folder(root):
    """A model folder as a user has it, plus one file whose name looks like an entry."""
    root.mkdir()
    save_file({"w": torch.ones(4, 4)}, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.ones(2)}, str(root / ("a" * 64 + ".safetensors")))
    return sorted(p.name for p in root.iterdir())


def test_clear_on_a_model_folder_deletes_only_the_entry(tmp_path):
    root = tmp_path / "model"
    mine = _model_folder(root)
    (tmp_path / "elsewhere").mkdir()
    _, far = _entry(tmp_path / "elsewhere", _matrix(seed=4))
    (root / far.name).symlink_to(far)  # a link named like an entry: not provably ours
    _, path = _entry(root, _matrix())
    size = path.stat().st_size
    r = CliRunner().invoke(cli, ["cache", "clear", "--yes", "--cache-dir", str(root)])
    assert r.exit_code == 0, r.output
    assert r.output == f"Removed 1 files ({human_bytes(size)}) from {root}; 4 other files ignored (not cache entries)\n"
    assert sorted(p.name for p in root.iterdir()) == sorted(mine + [far.name]) and far.exists()


def test_ls_and_clear_on_a_model_folder_touch_nothing(tmp_path):
    root = tmp_path / "model"
    _model_folder(root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root)])
    assert r.exit_code == 0 and r.output == f"No cached spectra in {root}\n3 other files ignored (not cache entries)\n"
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root), "--json", "-"])
    data = json.loads(r.stdout)
    assert (data["count"], data["entries"], data["ignored_files"]) == (0, [], 3)
    r = runner.invoke(cli, ["cache", "clear", "--cache-dir", str(root)])  # no --yes: nothing to confirm
    assert r.exit_code == 0 and r.output == f"No cached spectra in {root}; 3 other files ignored (not cache entries)\n"
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_damaged_and_old_entries_are_listed_and_cleared(tmp_path):
    """Entries whose header is the cache's are listed (ok=False, with the reason) and cleared even
    when their payload is short or their format old."""
    _, short = _entry(tmp_path, _matrix())
    short.write_bytes(short.read_bytes()[:-40])
    spec, old = _entry(tmp_path, _matrix(seed=2))
    _write_version_1(old, spec.key, {"U": spec.U, "S": spec.S, "Vh": spec.Vh})
    r = CliRunner().invoke(cli, ["cache", "ls", "--cache-dir", str(tmp_path), "--json", "-"])
    problems = {e["key"]: e["problem"] for e in json.loads(r.stdout)["entries"]}
    assert problems == {short.stem: "invalid: Error while deserializing header: incomplete metadata, file not fully "
                                    "covered", old.stem: _OLD.format(1)}
    r = CliRunner().invoke(cli, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert "(invalid: Error while deserializing header: incomplete metadata" in r.output
    assert SpectrumCache(tmp_path).clear()[0] == 2 and list(tmp_path.iterdir()) == []


def test_ls_json_to_a_file(tmp_path):
    root = tmp_path / "spectra"
    _entry(root, _matrix())
    out = tmp_path / "listing.json"
    runner = CliRunner()
    for _ in range(2):  # the second run replaces the listing the first one wrote
        r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root), "--json", str(out)])
        assert r.exit_code == 0, r.output
        assert r.output.startswith("KEY") and r.output.endswith(f"JSON written to {out}\n")
    data = json.loads(out.read_text())
    assert list(data)[:2] == ["lora_audit", "root"] and data["lora_audit"]["schema_version"] == 1
    assert data["count"] == 1 and data["entries"][0]["ok"] and data["entries"][0]["version"] == "3"
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    r = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(root), "--json", str(notes)])
    assert r.exit_code == 1 and "was not written by lora-audit" in r.output
    assert notes.read_text() == '{"mine": 1}'


# ---- the verification memo's source records: a base matrix's content key without hashing it again
def _base_and_tuned(tmp_path, dtype=torch.float32):
    from safetensors.torch import load_file

    from tests.helpers import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", dtype=dtype)
    tuned = tmp_path / "tuned"
    import shutil

    shutil.copytree(base, tuned)
    t = load_file(str(tuned / "model.safetensors"))
    for name in [n for n in t if n.endswith("proj.weight")]:
        t[name] = t[name] + 0.01 * torch.randn(t[name].shape, generator=torch.Generator().manual_seed(len(name))).to(dtype)
    save_file(t, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def _hashes(monkeypatch):
    import lora_audit.spectral.cache as sc

    calls = []
    real = sc.tensor_key

    def counted(W0):
        calls.append(1)
        return real(W0)

    monkeypatch.setattr(sc, "tensor_key", counted)
    return calls


def test_an_unchanged_base_file_is_not_hashed_again_and_an_edited_one_is(tmp_path, monkeypatch):
    import time

    import lora_audit.cache as store
    from lora_audit.spectral.api import run_spectrum

    monkeypatch.setattr(store, "MEMO_MARGIN_NS", 0)  # the fixture's files are seconds old
    base, tuned = _base_and_tuned(tmp_path)
    cache = tmp_path / "cache"

    def audit():
        res = run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=cache)
        return {m.name: m.max_cos for m in res.results[0].matrices}

    hashes = _hashes(monkeypatch)
    first = audit()  # cold: every key hashed, remembered
    n = len(hashes)
    assert n == len(first) > 0
    assert audit() == first and len(hashes) == n  # the keys from the memo, the same spectra
    memo = json.loads((cache / "lora-audit-spectrum.verified.json").read_text())
    assert len(memo["sources"]) == n
    # the base edited in place, same size, one matrix changed: its identity changes, every key is hashed
    time.sleep(0.05)
    from safetensors.torch import load_file

    t = load_file(str(base / "model.safetensors"))
    name = sorted(first)[0]
    t[name] = t[name] + torch.randn(t[name].shape, generator=torch.Generator().manual_seed(9))  # other singular vectors
    data = (base / "model.safetensors").read_bytes()
    save_file(t, str(tmp_path / "edited.safetensors"), metadata={"format": "pt"})
    edited = (tmp_path / "edited.safetensors").read_bytes()
    assert len(edited) == len(data)
    with open(base / "model.safetensors", "r+b") as fh:  # in place: the same inode
        fh.write(edited)
    third = audit()
    assert len(hashes) == 2 * n  # hashed again
    assert third[name] != first[name] and {k: v for k, v in third.items() if k != name} == \
        {k: v for k, v in first.items() if k != name}


def test_a_forged_source_record_is_not_used(tmp_path, monkeypatch):
    import lora_audit.cache as store
    from lora_audit.spectral.api import run_spectrum

    monkeypatch.setattr(store, "MEMO_MARGIN_NS", 0)
    base, tuned = _base_and_tuned(tmp_path)
    cache = tmp_path / "cache"
    run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=cache)
    path = cache / "lora-audit-spectrum.verified.json"
    memo = json.loads(path.read_text())
    first = sorted(memo["sources"])[0]
    memo["sources"][first][5] = "0" * 64  # another key for that matrix, the MAC not recomputed
    path.write_text(json.dumps(memo))
    hashes = _hashes(monkeypatch)
    res = run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=cache)
    assert len(hashes) == len(memo["sources"]) and res.results[0].matrices


def test_a_bfloat16_base_converted_to_float32_is_not_hashed_again_either(tmp_path, monkeypatch):
    """W0 is a function of the stored bytes (converted to float32 here): the key is remembered under
    how it was taken from them."""
    import lora_audit.cache as store
    from lora_audit.spectral.api import run_spectrum

    monkeypatch.setattr(store, "MEMO_MARGIN_NS", 0)
    base, tuned = _base_and_tuned(tmp_path, torch.bfloat16)
    hashes = _hashes(monkeypatch)
    first = run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=tmp_path / "cache")
    n = len(hashes)
    again = run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert n > 0 and len(hashes) == n
    assert [m.max_cos for m in again.results[0].matrices] == [m.max_cos for m in first.results[0].matrices]
    # a float64 audit of the same file is another W0: its own key, hashed
    run_spectrum(base, [tuned], device="cpu", progress=False, cache_dir=tmp_path / "cache", float64=True)
    assert len(hashes) == 2 * n
