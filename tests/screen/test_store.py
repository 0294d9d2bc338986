"""The screen folder's record store: complete records or none, whatever moment a run is killed."""

from __future__ import annotations

import json

import pytest

from lora_audit.errors import InputError, OutputError
from lora_audit.results.screen import ScreenRecord, ScreenSetup
from lora_audit.results.spectrum import MatrixResult, TunedResult
from lora_audit.screen import store as store_mod
from lora_audit.screen.store import ScreenStore

SETUP = ScreenSetup(base="base/", base_fingerprint="sha256:0123", k=10, epsilon=0.5, epsilon_sweep=[0.5])


def _record(name: str, intruders: int = 1, status: str = "ok") -> dict:
    result = None
    if status == "ok":
        result = TunedResult(tuned=name, matrices=[MatrixResult(name="m.weight", shape=[4, 4], max_cos=[0.1] * intruders + [0.9],
                                                                intruders=intruders)])
    return ScreenRecord(adapter=name, status=status, error="" if status == "ok" else "bad file",
                        fingerprint=f"sha256:{name}", result=result).to_json()


def test_records_round_trip_and_the_latest_wins(tmp_path):
    with ScreenStore.open(tmp_path / "s", SETUP) as st:
        st.append(_record("a", 1))
        st.append(_record("b", status="failed"))
        st.append(_record("a", 3))
    with ScreenStore.open(tmp_path / "s", SETUP, resume=True) as st:
        assert set(st.latest) == {"a", "b"}
        a = st.read(st.latest["a"])
        assert a.result.total_intruders == 3 and a.status == "ok" and a.fingerprint == "sha256:a"
        assert st.read(st.latest["b"]).error == "bad file"
        assert st.latest["a"].location.startswith("records/part-") and st.latest["a"].location.endswith(":3")
        lines = (tmp_path / "s" / "index.jsonl").read_text().splitlines()
        assert [json.loads(x)["adapter"] for x in lines] == ["a", "b", "a"]


def test_a_killed_writer_leaves_complete_records_or_none(tmp_path):
    """A torn record (no index line) and a torn index line are ignored, and the torn index tail is
    cut so that the next run appends clean lines."""
    folder = tmp_path / "s"
    with ScreenStore.open(folder, SETUP) as st:
        st.append(_record("a"))
        shard = folder / "records" / st.latest["a"].shard
    with open(shard, "ab") as fh:
        fh.write(b'{"lora_audit": {"schema": "screen-rec')  # killed while writing record "b"
    index = folder / "index.jsonl"
    with open(index, "ab") as fh:
        fh.write(b'{"adapter": "c", "fingerprint"')  # killed while writing an index line
    with ScreenStore.open(folder, SETUP, resume=True) as st:
        assert set(st.latest) == {"a"} and st.verified(st.latest["a"])
        assert index.read_bytes().endswith(b"\n")
        st.append(_record("b"))
    with ScreenStore.open(folder, SETUP, resume=True) as st:
        assert set(st.latest) == {"a", "b"}
        assert st.read(st.latest["b"]).adapter == "b"


def test_a_damaged_record_is_not_verified(tmp_path):
    folder = tmp_path / "s"
    with ScreenStore.open(folder, SETUP) as st:
        e = st.append(_record("a"))
    shard = folder / "records" / e.shard
    data = bytearray(shard.read_bytes())
    data[e.offset + 40] ^= 0x01
    shard.write_bytes(bytes(data))
    with ScreenStore.open(folder, SETUP, resume=True) as st:
        assert not st.verified(st.latest["a"])
        with pytest.raises(InputError, match="does not match its index entry"):
            st.read(st.latest["a"])


def test_a_bad_index_line_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "s"
    with ScreenStore.open(folder, SETUP) as st:
        st.append(_record("a"))
    with open(folder / "index.jsonl", "ab") as fh:
        fh.write(b'{"adapter": "x", "offset": "twelve"}\n')
    with ScreenStore.open(folder, SETUP, resume=True) as st:
        assert set(st.latest) == {"a"}
        assert len(st.warnings) == 1 and "line 2 skipped" in st.warnings[0]


def test_shards_rotate(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SHARD_BYTES", 1500)
    with ScreenStore.open(tmp_path / "s", SETUP) as st:
        for i in range(4):
            st.append(_record(f"a{i}"))
        shards = {e.shard for e in st.latest.values()}
        assert len(shards) > 1 and all(st.verified(e) for e in st.latest.values())


def test_opening_rules(tmp_path):
    folder = tmp_path / "s"
    ScreenStore.open(folder, SETUP).close()
    with pytest.raises(OutputError, match="holds an earlier screen; pass --resume"):
        ScreenStore.open(folder, SETUP)
    other = ScreenSetup(base="base/", base_fingerprint="sha256:4567", k=5, epsilon=0.5, epsilon_sweep=[0.5])
    with pytest.raises(InputError, match=r"base_fingerprint: sha256:0123 then, sha256:4567 now; k: 10 then, 5 now"):
        ScreenStore.open(folder, other, resume=True)
    with ScreenStore.open(folder, other, overwrite=True) as st:  # a new screen in its place
        assert st.latest == {}
    mine = tmp_path / "mine"
    (mine / "keep.txt").parent.mkdir()
    (mine / "keep.txt").write_text("user data")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(OutputError):
            ScreenStore.open(mine, SETUP, **kw)
    assert (mine / "keep.txt").read_text() == "user data"


def test_one_writer_at_a_time(tmp_path):
    with ScreenStore.open(tmp_path / "s", SETUP):
        with pytest.raises(OutputError, match="another lora-audit screen is writing"):
            ScreenStore.open(tmp_path / "s", SETUP, resume=True)
    ScreenStore.open(tmp_path / "s", SETUP, resume=True).close()  # released
