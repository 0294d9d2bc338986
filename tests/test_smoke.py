from click.testing import CliRunner

from lora_audit import __version__
from lora_audit.cli import COMMANDS, cli


def test_version_and_help_list_every_command():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for name in [*COMMANDS, "demo", "zoo"]:  # built in, and the studies' plugin commands
        assert name in r.output


def test_python_dash_m_runs_the_same_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lora_audit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "spectrum" in out.stdout and "Usage: lora-audit" in out.stdout


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


def test_atomic_outputs_get_normal_permissions(tmp_path):
    """mkstemp/mkdtemp create 0600/0700 entries; outputs must get the mode a plain open()/mkdir()
    gives under the process's umask (the reference made here beside them)."""
    from lora_audit.io import atomic_dir, atomic_write_text

    f = atomic_write_text(tmp_path / "r.html", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "a.txt").write_text("y")
    (tmp_path / "plain.txt").write_text("z")
    (tmp_path / "plain").mkdir()
    assert (f.stat().st_mode & 0o777) == ((tmp_path / "plain.txt").stat().st_mode & 0o777) != 0o600
    assert ((tmp_path / "d").stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777) != 0o700
