"""lora_audit.cache, the authenticated entry store both caches use: fields authenticated with the
tensors, the MAC and content keys against the blake3 package directly (one thread and several),
reserved fields, and the hashing of every dtype a cache may hold. The spectrum cache's own tests
(tests/spectral/test_cache*.py) and the profile cache's (tests/scan/test_scan.py) cover forgery,
damage and the key file through their users."""

import json

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_audit.cache import CacheWarning, EntryStore, content_key, raw_bytes

SECRET = bytes(range(32))


def _store(root, **kw):
    return EntryStore(root, "test-format", "7", secret=SECRET, **kw)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b": torch.randn(3, 5, generator=g), "a": torch.arange(4, dtype=torch.int64),
            "c": torch.randn(7, generator=g).double()}


def test_round_trip_and_mac_definition(tmp_path):
    store = _store(tmp_path)
    path = store.write("k" * 64, _tensors(), {"note": "x", "shape": "[3, 5]"})
    entry = store.get("k" * 64)
    assert entry.fields == {"note": "x", "shape": "[3, 5]"}
    for name, t in _tensors().items():
        assert torch.equal(entry.tensors[name], t)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    msg = json.dumps(["test-format", "7", "k" * 64, {"note": "x", "shape": "[3, 5]"}]).encode() + b"\0"
    for name, t in sorted(_tensors().items()):
        msg += json.dumps([name, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode() + b"\0"
        msg += t.numpy().tobytes()
    assert meta["mac"] == "blake3-keyed:" + blake3.blake3(msg, key=SECRET).hexdigest()


def test_large_tensor_mac_is_the_same_on_several_threads(tmp_path):
    """A tensor above the threaded-hashing size: the MAC is the plain keyed BLAKE3 of the message."""
    big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB
    store = _store(tmp_path)
    path = store.write("b" * 64, {"x": big})
    msg = json.dumps(["test-format", "7", "b" * 64, {}]).encode() + b"\0"
    msg += json.dumps(["x", "float32", [3 << 20]]).encode() + b"\0" + big.numpy().tobytes()
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["mac"] == "blake3-keyed:" + blake3.blake3(msg, key=SECRET, max_threads=1).hexdigest()
    assert torch.equal(store.get("b" * 64).tensors["x"], big)


@pytest.mark.parametrize("edit", [
    lambda meta, t: meta.update(note="y"),  # a field edited
    lambda meta, t: meta.update(extra="1"),  # a field added
    lambda meta, t: meta.pop("note"),  # a field removed
    lambda meta, t: t.update(a=t["a"] + 1),  # a tensor edited
    lambda meta, t: t.update(d=torch.zeros(1)),  # a tensor added
])
def test_every_field_and_tensor_is_authenticated(tmp_path, edit):
    store = _store(tmp_path)
    path = store.write("e" * 64, _tensors(), {"note": "x"})
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(CacheWarning, match="MAC does not verify"):
        assert _store(tmp_path).get("e" * 64) is None
    assert not path.exists()


def test_another_format_or_secret_does_not_verify(tmp_path):
    _store(tmp_path).write("f" * 64, _tensors())
    with pytest.warns(CacheWarning, match="metadata does not match"):
        assert EntryStore(tmp_path, "other-format", "7", secret=SECRET).get("f" * 64) is None
    _store(tmp_path).write("f" * 64, _tensors())
    with pytest.warns(CacheWarning, match="MAC does not verify"):
        assert EntryStore(tmp_path, "test-format", "7", secret=b"x" * 32).get("f" * 64) is None
    _store(tmp_path).write("f" * 64, _tensors())
    with pytest.warns(CacheWarning, match=r"older lora-audit \(format version 7"):
        assert EntryStore(tmp_path, "test-format", "8", secret=SECRET).get("f" * 64) is None


def test_check_refuses_before_use(tmp_path):
    store = _store(tmp_path)
    store.write("c" * 64, _tensors())

    def check(fields, tensors):
        raise ValueError("not the shape I want")

    with pytest.warns(CacheWarning, match="not the shape I want"):
        assert store.get("c" * 64, check) is None
    assert store.rebuilt == 1 and store.get("c" * 64) is None  # deleted: a miss


def test_reserved_fields_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        _store(tmp_path).write("r" * 64, _tensors(), {"mac": "mine"})


def test_content_key_frames_its_parts():
    t = torch.arange(6, dtype=torch.float32)
    assert content_key("s", "ab", "c") != content_key("s", "a", "bc")
    assert content_key("s", t) != content_key("s", t.reshape(2, 3))
    assert content_key("s", t) != content_key("s", t.view(torch.int32))  # same bytes, other dtype
    assert content_key("s", t) != content_key("t", t)
    raw = t.numpy().tobytes()
    assert content_key("s", t) == blake3.blake3(b"s\0" + f"Ttorch.float32|[6]|{len(raw)}\0".encode() + raw).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_raw_bytes_of_every_dtype(dtype):
    t = torch.arange(10).to(dtype)
    assert bytes(raw_bytes(t)) == bytes(t.view(torch.uint8).numpy()) and len(raw_bytes(t)) == 10 * t.element_size()
    assert bytes(raw_bytes(t[::2])) == bytes(t[::2].contiguous().view(torch.uint8).numpy())


# ---- the verification memo: an entry verified in full is not hashed again while its file is unchanged
def _memo_store(tmp_path, monkeypatch, margin_ns=0, **kw):
    import lora_audit.cache as cache

    monkeypatch.setattr(cache, "MEMO_MARGIN_NS", margin_ns)
    return _store(tmp_path, **kw)


def _count_macs(monkeypatch):
    import lora_audit.cache as cache

    calls = []
    real = cache.entry_mac

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(cache, "entry_mac", counted)
    return calls


def test_memo_spares_the_hash_of_an_unchanged_entry(tmp_path, monkeypatch):
    key = "a" * 64
    _memo_store(tmp_path, monkeypatch).write(key, _tensors(), {"note": "x"})
    macs = _count_macs(monkeypatch)
    first = _store(tmp_path)
    assert first.get(key) is not None and len(macs) == 1  # verified in full
    first.save_memo()
    assert first.memo_path.is_file()
    again = _store(tmp_path)  # another process: reads the memo file
    entry = again.get(key)
    assert len(macs) == 1 and again.memo_hits == 1  # not hashed again
    for name, t in _tensors().items():
        assert torch.equal(entry.tensors[name], t)
    with pytest.warns(CacheWarning, match="corrupt"):  # the caller's check still runs
        assert again.get(key, check=lambda fields, tensors: (_ for _ in ()).throw(ValueError("no"))) is None


def _memoised(tmp_path, monkeypatch, key="b" * 64):
    store = _memo_store(tmp_path, monkeypatch)
    path = store.write(key, _tensors(), {"note": "x"})
    assert store.get(key) is not None
    store.save_memo()
    return path


def test_memo_does_not_cover_an_entry_edited_in_place(tmp_path, monkeypatch):
    import time

    path = _memoised(tmp_path, monkeypatch)
    time.sleep(0.05)  # past a timestamp tick: the MARGIN (0 here) is what covers edits within one
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, same name
    with open(path, "r+b") as fh:
        fh.write(bytes(data))
    store = _store(tmp_path)
    with pytest.warns(CacheWarning, match="MAC does not verify"):
        assert store.get("b" * 64) is None
    assert store.memo_hits == 0


def test_memo_does_not_cover_a_replaced_entry(tmp_path, monkeypatch):
    import os

    path = _memoised(tmp_path, monkeypatch)
    forged = bytearray(path.read_bytes())
    forged[-1] ^= 1
    (tmp_path / "forged").write_bytes(bytes(forged))
    os.replace(tmp_path / "forged", path)  # another inode under the entry's name
    with pytest.warns(CacheWarning, match="MAC does not verify"):
        assert _store(tmp_path).get("b" * 64) is None


@pytest.mark.parametrize("how", ["edited record", "other key", "not JSON", "other version"])
def test_a_forged_or_foreign_memo_is_not_used(tmp_path, monkeypatch, how):
    _memoised(tmp_path, monkeypatch)
    memo = tmp_path / "test-format.verified.json"
    doc = json.loads(memo.read_text())
    if how == "edited record":
        doc["entries"]["b" * 64][2] += 1
        memo.write_text(json.dumps(doc))
    elif how == "other key":
        other = EntryStore(tmp_path, "test-format", "7", secret=bytes(32))
        memo.write_text(json.dumps({**doc, "mac": other._memo_mac(doc["entries"], doc["sources"])}))
    elif how == "not JSON":
        memo.write_bytes(b"\xff" * 10)
    else:
        doc["version"] = "0"
        memo.write_text(json.dumps(doc))
    macs = _count_macs(monkeypatch)
    store = _store(tmp_path)
    assert store.get("b" * 64) is not None
    assert len(macs) == 1 and store.memo_hits == 0  # verified in full


def test_a_fresh_entry_is_not_remembered(tmp_path):
    store = _store(tmp_path)  # the default margin: a file changed within 2 s may share its ctime with an edit
    store.write("c" * 64, _tensors())
    assert store.get("c" * 64) is not None
    store.save_memo()
    assert not store.memo_path.exists()


def test_memo_is_the_caches_own_and_a_foreign_file_is_left_alone(tmp_path, monkeypatch):
    _memoised(tmp_path, monkeypatch)
    store = _store(tmp_path)
    found = store.scan()
    assert found.memo == tmp_path / "test-format.verified.json" and found.ignored == 0
    size = found.memo.stat().st_size + sum(e.size for e in found.entries)
    assert store.clear() == (2, size)
    assert not found.memo.exists()
    # a file of that name the cache did not write: never used, replaced or deleted
    foreign = tmp_path / "test-format.verified.json"
    foreign.write_text('{"format": "someone else"}')
    key = "d" * 64
    store = _memo_store(tmp_path, monkeypatch)
    store.write(key, _tensors())
    assert store.get(key) is not None
    store.save_memo()
    assert foreign.read_text() == '{"format": "someone else"}'
    assert store.scan().ignored == 1 and store.scan().memo is None
    store.clear()
    assert foreign.exists()


def test_memo_is_not_used_where_ctime_is_not_a_change_time(tmp_path, monkeypatch):
    """On Windows st_ctime is the creation time: an edit with mtime set back would keep the identity."""
    import lora_audit.cache as cache

    _memoised(tmp_path, monkeypatch)
    monkeypatch.setattr(cache, "MEMO_SOUND", False)
    macs = _count_macs(monkeypatch)
    store = _store(tmp_path)
    assert store.get("b" * 64) is not None and len(macs) == 1 and store.memo_hits == 0
