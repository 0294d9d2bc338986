from click.testing import CliRunner

from lora_audit import __version__
from lora_audit.cli import COMMANDS, cli


def test_version_and_help_list_every_command():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for name in COMMANDS:
        assert name in r.output


def test_unknown_command_suggests_the_close_one():
    r = CliRunner().invoke(cli, ["spectrun"])
    assert r.exit_code == 2
    assert "Did you mean 'spectrum'?" in r.output


def test_tiny_fixtures_load(tiny_llama, tiny_gpt2):
    from lora_audit.checkpoints.models import load_model

    lm = load_model(str(tiny_llama), device="cpu")
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True).endswith("assistant\n")
    assert load_model(str(tiny_gpt2), device="cpu").model.config.model_type == "gpt2"
