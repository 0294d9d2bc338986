"""Fixtures for the safety tests: adapters on the tiny Llama, one for another base, a tuned full model."""

from __future__ import annotations

import json
import shutil

import pytest

from ..helpers import make_peft_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("safety_adapter") / "ad", seed=3, init_scale=0.5)


@pytest.fixture(scope="session")
def tiny_full_tuned(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("safety_full") / "tuned_full", seed=7)


@pytest.fixture(scope="session")
def other_base_adapter(tmp_path_factory):
    other = make_tiny_llama(tmp_path_factory.mktemp("safety_other") / "other_base", hidden=32, intermediate=48)
    return make_peft_adapter(other, tmp_path_factory.mktemp("safety_other_ad") / "ad_other")


@pytest.fixture(scope="session")
def no_template_model(tiny_llama, tmp_path_factory):
    """A copy of the tiny Llama whose tokenizer has no chat template."""
    d = tmp_path_factory.mktemp("safety_notmpl") / "m"
    shutil.copytree(tiny_llama, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (d / extra).unlink(missing_ok=True)
    return d
