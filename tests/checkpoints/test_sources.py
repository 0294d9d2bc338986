"""Model folders as hostile input: a shard index or a symlink cannot swap in another model's weights,
broken config.json / index files are named with what is accepted; the Hugging Face cache layout
(snapshots/<rev>/ symlinks into blobs/) still opens."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lora_audit.checkpoints import load_model, open_stream
from lora_audit.checkpoints.sources import open_weights
from lora_audit.errors import FormatError, InputError
from tests.helpers import copy_with, make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("sharded") / "m", shard_size="20KB")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("other") / "other", seed=5, tokenizer=False)


def _copy_with_index(sharded, tmp_path, rewrite):
    """A copy of the sharded model whose index's first shard name is replaced by rewrite(name)."""
    m = tmp_path / "m"
    shutil.copytree(sharded, m)
    p = m / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    first = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"] = {k: (rewrite(v) if v == first else v) for k, v in idx["weight_map"].items()}
    p.write_text(json.dumps(idx))
    return m, p


@pytest.mark.parametrize("rewrite", [
    lambda name: "../other/model.safetensors",
    lambda name: "sub/../../other/model.safetensors",
    lambda name: "..\\other\\model.safetensors",
    lambda name: "C:model.safetensors",
], ids=["dotdot", "nested-dotdot", "backslash", "drive"])
def test_index_naming_a_file_outside_the_folder(sharded, other, tmp_path, rewrite):
    m, index = _copy_with_index(sharded, tmp_path, rewrite)
    (tmp_path / "other").symlink_to(other)  # so that ../other/model.safetensors exists
    msg = "which is not a plain file name inside"
    with pytest.raises(InputError, match=msg) as e:
        open_weights(m)
    assert str(index) in str(e.value)
    with pytest.raises(InputError, match=msg):
        open_stream(str(other), [str(m)])
    with pytest.raises(InputError, match=msg):  # whole-model loading checks the folder before transformers
        load_model(str(m), device="cpu")


def test_index_naming_an_absolute_path(sharded, other, tmp_path):
    m, index = _copy_with_index(sharded, tmp_path, lambda name: str(other / "model.safetensors"))
    with pytest.raises(InputError, match=rf"{index}: names shard '{other}/model.safetensors', which is not a plain"):
        open_weights(m)


def test_symlink_out_of_the_folder(sharded, other, tmp_path):
    m, index = _copy_with_index(sharded, tmp_path, lambda name: name)
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    (m / shard).unlink()
    (m / shard).symlink_to(other / "model.safetensors")
    with pytest.raises(InputError, match=rf"shard {shard} resolves to .*other/model.safetensors, outside the model "
                                         "folder"):
        open_weights(m)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(other / "config.json", single)
    (single / "model.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(InputError, match="weight file model.safetensors resolves to .*, outside the model folder"):
        open_weights(single)


def test_symlink_inside_the_folder_is_fine(sharded, tmp_path):
    m, index = _copy_with_index(sharded, tmp_path, lambda name: "weights/" + name)
    (m / "weights").mkdir()
    first = sorted(p.name for p in m.glob("model-*.safetensors"))[0]
    (m / "weights" / first).symlink_to(m / first)
    src = open_weights(m)
    assert set(src.names()) == set(open_weights(sharded).names())


def _hf_cache_repo(model, root, name="models--someone--tiny"):
    """The Hugging Face cache layout of ``model``: blobs/<hash> files and snapshots/<rev>/<file> symlinks."""
    repo = root / name
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    return repo, snap


def test_hugging_face_cache_layout_opens(sharded, tiny_llama, tmp_path):
    _, snap = _hf_cache_repo(sharded, tmp_path / "hub")
    src, ref = open_weights(snap), open_weights(sharded)
    assert src.names() == ref.names()
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(src.get(name), ref.get(name))
    a = make_peft_adapter(sharded, tmp_path / "a", target_modules=["q_proj"])
    _, asnap = _hf_cache_repo(a, tmp_path / "hub", "models--someone--adapter")
    assert len(list(open_stream(str(snap), [str(asnap)]))) == 2


def test_hugging_face_cache_symlink_into_another_repo_is_refused(sharded, other, tmp_path):
    _, snap = _hf_cache_repo(sharded, tmp_path / "hub")
    orepo, _ = _hf_cache_repo(other, tmp_path / "hub", "models--else--other")
    shard = sorted(p.name for p in snap.glob("model-*.safetensors"))[0]
    (snap / shard).unlink()
    blob = next(b for b in (orepo / "blobs").iterdir() if b.stat().st_size > 10000)
    (snap / shard).symlink_to(blob)
    with pytest.raises(InputError, match=f"shard {shard} resolves to {blob}, outside the model folder"):
        open_weights(snap)


@pytest.mark.parametrize("text, cls, msg", [
    ("[1]", InputError, "the shard index must be a JSON object, got a JSON list"),
    ("null", InputError, "the shard index must be a JSON object, got null"),
    (b"\xff{", InputError, "the shard index is not UTF-8"),
    ('{"metadata": {}}', FormatError, "field 'weight_map' must be a non-empty object .*; got null"),
    ('{"weight_map": ["a"]}', FormatError, "field 'weight_map' must be a non-empty object .*; got a list"),
    ('{"weight_map": {"lm_head.weight": 3}}', FormatError,
     r"weight_map\['lm_head.weight'\] is a number; it must be a shard file name"),
])
def test_broken_shard_index(sharded, tmp_path, text, cls, msg):
    p = copy_with(sharded, tmp_path / "m", "model.safetensors.index.json", text)
    with pytest.raises(cls, match=msg) as e:
        open_weights(p.parent)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("text, msg", [
    ("[]", "the model config must be a JSON object, got a JSON list"),
    ("null", "the model config must be a JSON object, got null"),
    (b"\xfe\xff", "the model config is not UTF-8"),
])
def test_broken_model_config(tiny_llama, tmp_path, text, msg):
    p = copy_with(tiny_llama, tmp_path / "m", "config.json", text)
    m = p.parent
    for call in (lambda: open_weights(m), lambda: load_model(str(m), device="cpu")):
        with pytest.raises(InputError, match=msg) as e:
            call()
        assert str(p) in str(e.value)
