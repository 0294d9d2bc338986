"""The shipped JSON Schemas (docs/schema/) are what the code exports, and real outputs of every
command validate against them: each command is run on tiny models, and its JSON is checked with
jsonschema against the shipped file, and again with every object closed (additionalProperties:
false), so that a field the tool writes but the schema does not declare fails here. (The shipped
schemas stay open: the contract only grows, and a newer file must still validate for an older
reader.) The demo's and zoo's files are checked in tests/studies, where those commands run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli

from ..helpers import make_peft_adapter
from ..json_schemas import SCHEMA_DIR, check, result_classes, schema_files, shipped
from ..scan.conftest import make_refusing_llama, write_prompts

jsonschema = pytest.importorskip("jsonschema")


def test_shipped_schemas_are_what_the_code_exports():
    want = schema_files()
    have = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.schema.json")}
    stale = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    assert not stale, f"docs/schema is out of date ({', '.join(stale)}): run `make schemas`"


@pytest.mark.parametrize("cls", result_classes(), ids=lambda c: c.SCHEMA)
def test_every_schema_is_a_valid_json_schema_naming_its_kind(cls):
    schema = shipped(cls.SCHEMA)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["lora_audit"]["properties"]["schema"] == {"const": cls.SCHEMA}
    assert schema["required"][0] == "lora_audit"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_llama):
    """Every command's JSON, from real runs on tiny models: {kind: [JSON objects]}."""
    tmp = tmp_path_factory.mktemp("contracts")
    prompts = write_prompts(tmp / "prompts")
    base = make_refusing_llama(tmp / "base", prompts)
    ad = make_peft_adapter(base, tmp / "adapters" / "ad", seed=5, init_scale=0.05)
    ad2 = make_peft_adapter(base, tmp / "adapters" / "ad2", seed=6, init_scale=0.05)
    run = CliRunner().invoke
    cache = ["--cache-dir", str(tmp / "cache")]

    def ok(args: list[str]) -> None:
        r = run(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code in (0, 3), r.output  # 3: a gate tripped (the JSON is written all the same)

    ok(["spectrum", base, ad, ad2, "--k", "4", "--device", "cpu", *cache, "--json", tmp / "spectrum.json",
        "--fail-on", "intruders>0,structural>0"])
    ok(["safety-eval", base, ad, "--limit", "2", "--max-new-tokens", "3", "--tasks", "none",
        "--batch-size", "2", "--device", "cpu", "--json", tmp / "safety.json", "--fail-on", "refusal_drop>0.9"])
    ok(["safety-scan", base, ad, "--prompts", prompts[0], "--benign", prompts[1], "--chat-template", prompts[2],
        "--device", "cpu", "--json", tmp / "scan.json"])
    ok(["screen", base, tmp / "adapters", "--out", tmp / "screen", "--workers", "0", "--k", "4", "--device", "cpu",
        *cache, "--detail", "0", "-q", "--fail-on", "intruders>1000"])
    ok(["finetune", tiny_llama, "--method", "lora", "--data", "builtin:alpaca-mini", "--out", tmp / "ft",
        "--steps", "2", "--batch-size", "2", "--max-length", "32", "--device", "cpu", "--json", tmp / "training.json"])
    ok(["federated", ad, ad2, "--out", tmp / "agg", "--json", tmp / "federated.json"])
    ok(["mitigate", base, ad, "--lambda", "0.5", "--k", "4", "--out", tmp / "mitigated", "--device", "cpu", *cache,
        "--json", tmp / "mitigate.json"])
    ok(["cache", "ls", *cache, "--json", tmp / "cache.json"])

    def load(p: Path) -> dict:
        return json.loads(p.read_text(encoding="utf-8"))

    screen = tmp / "screen"
    return {
        "spectrum": [load(tmp / "spectrum.json")],
        "safety": [load(tmp / "safety.json")],
        "safety-scan": [load(tmp / "scan.json")],
        "screen": [load(screen / "summary.json")],
        "screen-setup": [load(screen / "screen.json")],
        "screen-record": [json.loads(line) for f in sorted((screen / "records").glob("*.jsonl"))
                          for line in f.read_text(encoding="utf-8").splitlines() if line.strip()],
        "training": [load(tmp / "training.json"), load(tmp / "ft" / "training.json")],
        "federated": [load(tmp / "federated.json"), load(tmp / "agg" / "federated.json")],
        "mitigate": [load(tmp / "mitigate.json"), load(tmp / "mitigated" / "mitigate.json")],
        "cache-listing": [load(tmp / "cache.json")],
    }


@pytest.mark.parametrize("kind", ["spectrum", "safety", "safety-scan", "screen", "screen-setup", "screen-record",
                                  "training", "federated", "mitigate", "cache-listing"])
def test_real_outputs_validate_against_the_shipped_schema(outputs, kind):
    assert outputs[kind], f"no {kind} output"
    cls = next(c for c in result_classes() if c.SCHEMA == kind)
    for obj in outputs[kind]:
        check(obj, kind)
        assert cls.from_json(obj, source=kind).to_json()["lora_audit"]["schema"] == kind  # and reads back


def test_the_closed_check_catches_a_field_the_schema_does_not_declare(outputs):
    obj = copy.deepcopy(outputs["spectrum"][0])
    obj["results"][0]["matrices"][0]["undeclared"] = 1
    with pytest.raises(AssertionError, match="undeclared"):
        check(obj, "spectrum")


def test_gates_and_findings_are_in_the_outputs(outputs):
    """The optional parts the schemas describe were really written (not only null)."""
    spectrum, safety, screen = outputs["spectrum"][0], outputs["safety"][0], outputs["screen"][0]
    assert spectrum["gate"] and safety["gate"] and screen["gate"]
    assert spectrum["results"][0]["matrices"] and outputs["cache-listing"][0]["entries"]


def test_the_packaged_risk_file_validates():
    from lora_audit.scan.risk import default_risk_file

    check(json.loads(default_risk_file().read_text(encoding="utf-8")), "scan-risk")
