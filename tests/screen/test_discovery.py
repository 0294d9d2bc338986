"""Finding adapters under folders and reading manifests (no models needed: the files only have to
look like adapters to be found; the screen reads them later)."""

from __future__ import annotations

import os

import pytest

from lora_audit.errors import FormatError, InputError
from lora_audit.screen.discovery import Entry, discover, read_manifest, unique


def _touch(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_discover_takes_items_whole_and_searches_the_rest(tmp_path):
    root = tmp_path / "hub"
    _touch(root / "org1" / "peft-a" / "adapter_config.json", "{}")
    _touch(root / "org1" / "peft-a" / "adapter_model.safetensors")
    _touch(root / "org1" / "peft-a" / "nested" / "x.safetensors")  # inside an item: not searched
    _touch(root / "org2" / "full-ft" / "config.json", "{}")
    _touch(root / "org2" / "full-ft" / "model.safetensors")
    _touch(root / "kohya" / "b.safetensors")
    _touch(root / "kohya" / "a.safetensors")
    _touch(root / "kohya" / "notes.txt")
    _touch(root / "q.gguf")
    _touch(root / ".git" / "objects" / "x.safetensors")  # hidden: skipped
    _touch(root / "empty-org" / "README.md")
    os.symlink(root / "org1", root / "loop")  # a link to a folder that is not an item: not followed
    entries, warnings = discover([str(root)])
    assert [e.adapter for e in entries] == [os.path.join(str(root), p) for p in (
        "kohya/a.safetensors", "kohya/b.safetensors", "org1/peft-a", "org2/full-ft", "q.gguf")]
    assert all(e.path == e.adapter and e.label == e.adapter for e in entries)
    assert warnings == []


def test_discover_items_given_directly_and_exclusions(tmp_path):
    peft = _touch(tmp_path / "p" / "adapter_config.json", "{}").parent
    file = _touch(tmp_path / "k.safetensors")
    base = _touch(tmp_path / "all" / "base" / "config.json", "{}").parent
    _touch(base / "model.safetensors")
    _touch(tmp_path / "all" / "one.safetensors")
    _touch(tmp_path / "none" / "README.md")
    entries, warnings = discover([str(peft), str(file), str(tmp_path / "all"), str(tmp_path / "none")],
                                 exclude=[base])
    assert [e.adapter for e in entries] == [str(peft), str(file), os.path.join(str(tmp_path / "all"), "one.safetensors")]
    assert len(warnings) == 1 and "none" in warnings[0] and "no adapter found" in warnings[0]
    with pytest.raises(InputError, match="missing: no such file or folder"):
        discover([str(tmp_path / "missing")])


def test_manifest_paths_names_hub_ids_and_comments(tmp_path):
    _touch(tmp_path / "ads" / "a" / "adapter_config.json", "{}")
    _touch(tmp_path / "owner" / "local" / "adapter_config.json", "{}")  # exists locally: a path, not a hub id
    absolute = _touch(tmp_path / "elsewhere" / "k.safetensors")
    manifest = _touch(tmp_path / "list.txt", "\n".join([
        "# adapters to screen", "", "ads/a\tmy adapter", "owner/local", "someone/hub-adapter\thub one",
        str(absolute), "ads/missing", "ads/sub/missing", "with space/x  ",
    ]) + "\n")
    entries = read_manifest(manifest)
    assert entries == [
        Entry("ads/a", str(tmp_path / "ads" / "a"), "my adapter"),
        Entry("owner/local", str(tmp_path / "owner" / "local")),
        Entry("someone/hub-adapter", "someone/hub-adapter", "hub one"),
        Entry(str(absolute), str(absolute)),
        Entry("ads/missing", "ads/missing"),  # missing here and shaped like a hub id: a hub id
        Entry("ads/sub/missing", str(tmp_path / "ads" / "sub" / "missing")),  # screened, and recorded as failed
        Entry("with space/x", str(tmp_path / "with space" / "x")),
    ]
    assert entries[0].label == "my adapter" and entries[1].label == "owner/local"


@pytest.mark.parametrize("line, message", [
    ("a\tb\tc", "line 2 has 2 TABs"),
    ("\tname", "line 2 has a name but no adapter"),
])
def test_manifest_bad_lines_name_the_line(tmp_path, line, message):
    manifest = _touch(tmp_path / "m.txt", f"ok\n{line}\n")
    with pytest.raises(FormatError, match=message):
        read_manifest(manifest)


def test_manifest_must_be_a_text_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_manifest(tmp_path / "absent.txt")
    (tmp_path / "bin.txt").write_bytes(b"a\x00b")
    with pytest.raises(FormatError, match="NUL byte"):
        read_manifest(tmp_path / "bin.txt")


def test_unique_keeps_the_first_of_repeats():
    entries, warnings = unique([Entry("a", "a", "first"), Entry("b", "b"), Entry("a", "a", "second")])
    assert entries == [Entry("a", "a", "first"), Entry("b", "b")]
    assert warnings == ["a: names an adapter listed before (the same path, however written); screened once"]
