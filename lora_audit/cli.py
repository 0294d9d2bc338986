"""The ``lora-audit`` command line: one click group, each command in its own module under
``lora_audit.commands``, imported only when that command runs (start-up stays fast).

User mistakes (``LoraAuditError``, click usage errors) print ``Error: ...`` and exit non-zero
without a traceback. Anything else is a bug: it is reported in one line, and set
``LORA_AUDIT_RAISE_ERRORS=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from . import __version__
from .commands._common import CONTEXT, has_verbosity_options, verbosity_options, verbosity_params

# command name -> ("module:attribute", one-line help). Further commands come from installed plugins: the
# entry-point group PLUGIN_GROUP (the studies' ``demo`` and ``zoo`` are registered there by pyproject.toml).
COMMANDS: dict[str, tuple[str, str]] = {
    "spectrum": ("lora_audit.commands.spectrum:spectrum", "Intruder-dimension audit of tuned models against their base."),
    "screen": ("lora_audit.commands.screen:screen", "Audit thousands of adapters of one base as one resumable job (local or Ray)."),
    "cache": ("lora_audit.commands.cache:cache", "List or clear the base-spectrum cache."),
    "model": ("lora_audit.commands.model:model", "Fetch the embedded default model (SmolLM2-135M-Instruct) or print its path."),
    "safety-eval": ("lora_audit.commands.safety:safety_eval", "Refusal, over-refusal and capability, base vs tuned, with a verdict."),
    "safety-scan": ("lora_audit.commands.scan:safety_scan", "Edits along the refusal direction and a first-token refusal proxy, no generation."),
    "finetune": ("lora_audit.commands.finetune:finetune", "Fine-tune a model with a reference method (LoRA, DoRA, LoRA-GA, ...)."),
    "federated": ("lora_audit.commands.finetune:federated", "Aggregate federated client adapters and report the aggregation bias."),
    "mitigate": ("lora_audit.commands.finetune:mitigate", "Scale down intruder dimensions of an adapter and write a new one."),
    "report": ("lora_audit.commands.report:report", "Render result JSON files into one self-contained HTML report."),
    "audit": ("lora_audit.commands.report:audit", "Spectrum + safety-eval + report in one go."),
}


PLUGIN_GROUP = "lora_audit.commands"


def plugin_commands() -> dict[str, str]:
    """command name -> "module:attribute" of the installed plugins' commands (entry points in
    PLUGIN_GROUP); a plugin never replaces a built-in command. Read only when a command is not
    built in, or when the group's help lists them, so a built-in command's start-up never pays for
    it."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS) | set(plugin_commands()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        target = COMMANDS[name][0] if name in COMMANDS else plugin_commands().get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        cmd = getattr(module, attr)
        if not isinstance(cmd, click.Group) and not has_verbosity_options(cmd):
            cmd.params.extend(verbosity_params())  # -q / -v after every command's name, plugins' included
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help for the group lists the short descriptions; built-in commands are not imported for it.
        rows = [(name, COMMANDS[name][1]) for name in COMMANDS]
        for name in plugin_commands():
            cmd = self.get_command(ctx, name)
            if cmd is not None:
                rows.append((name, cmd.get_short_help_str(limit=formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            import difflib

            names = [*COMMANDS, *plugin_commands()]
            if args and args[0] not in names:
                close = difflib.get_close_matches(args[0], names, n=1)
                if close:
                    raise click.UsageError(f"{e.message} Did you mean '{close[0]}'?", ctx) from None
            raise


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="lora-audit")
@verbosity_options
def cli() -> None:
    """Audit fine-tuned language models against their base.

    \b
    Weight side:  intruder dimensions and spectral measures (Shuttleworth et al. 2024).
    Behaviour:    refusal, over-refusal and capability (Lermen et al. 2023).
    Reports:      self-contained HTML comparing many tuned models.

    \b
    Exit codes: 0 ok, 1 error (nothing written), 2 usage, 3 --fail-on gate tripped,
    4 incomplete (results written; some matrices could not be audited).
    -q/--quiet and -v/--verbose may also follow the command's name.
    Set LORA_AUDIT_RAISE_ERRORS=1 to see Python tracebacks of unexpected errors.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one printable line on stderr ('Warning: ...'), without source lines."""
    from .text import printable

    print(f"Warning: {printable(str(message), multiline=True)}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point with the error policy described in the module docstring.
    Everything printed about an error is made printable (``lora_audit.text``)."""
    import io
    import warnings

    from . import startup
    from .errors import EXIT_ERROR, LoraAuditError
    from .text import printable

    if argv is None:  # this process's own command line (not a caller's in-process run)
        startup.hold()  # until the work begins: startup says why

    def say(text: str) -> None:
        click.echo(printable(text, multiline=True), err=True)

    warnings.showwarning = _show_warning
    try:
        # Without standalone mode click returns (not raises) the status a command exits with
        # (exit_status: 3 gate tripped, 4 incomplete); a command's own return value is None.
        code = cli.main(args=argv, prog_name="lora-audit", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        say("Aborted.")
        sys.exit(130)
    except click.ClickException as e:
        buf = io.StringIO()
        e.show(file=buf)
        say(buf.getvalue().rstrip("\n"))
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except LoraAuditError as e:
        say(f"Error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        say("Interrupted.")
        sys.exit(130)
    except Exception as e:  # a bug, or an environment problem we did not foresee
        if os.environ.get("LORA_AUDIT_RAISE_ERRORS"):
            raise
        from .device import is_oom

        if is_oom(e):
            say("Error: out of memory on the device. Try --device cpu, a smaller --batch-size, or fewer models per run.")
            sys.exit(EXIT_ERROR)
        say(f"Error: unexpected {type(e).__name__}: {e}\n"
            "This is a bug in lora-audit; rerun with LORA_AUDIT_RAISE_ERRORS=1 for the traceback.")
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":  # pragma: no cover
    main()
