"""What every command shares: options with one meaning everywhere, safe printing, result output
and exit codes.

The output options, one definition each (the habit of simonw/llm and ruff: one grammar across
subcommands), on every command that writes results:

- ``--json PATH|-`` (``json_option``): the command's result JSON at PATH, written atomically after
  success, never over a file lora-audit did not write; ``-`` prints it to stdout, and then
  everything else the command prints goes to stderr, so stdout is exactly one JSON document.
- ``--sarif PATH`` (``sarif_option``): the findings as SARIF 2.1.0 (``lora_audit.report.sarif``), on
  every command that can gate.
- ``-o/--out`` (``out_option``): where the command's outputs go (a folder, or for ``report`` the file).
- ``-q/--quiet`` and ``-v/--verbose`` (``verbosity_options``): accepted before or after the command
  name (``lora-audit -q audit ...`` = ``lora-audit audit ... -q``); they set
  ``lora_audit.progress``'s verbosity for the whole run, so every stage follows: quiet has no bars,
  no stage or heartbeat lines and the shortest summary; verbose also shows the libraries' own bars,
  logs and warnings. A command reads it with ``quiet()``.

Also:

- ``echo``: everything the CLI prints goes through ``lora_audit.text.printable``: names from
  checkpoints cannot move the cursor, clear the screen or reorder text.
- ``--fail-on EXPR`` (``fail_on_option``): the release gate of ``lora_audit.results.gate``, parsed
  before any work (a bad expression is a usage error, status 2, with the grammar and the fields);
  repeatable, the conditions of every occurrence combined (the gate trips when any holds).
- Exit codes: ``lora_audit.errors`` (0 ok, 1 error, 2 usage, 3 gate tripped, 4 incomplete);
  ``exit_code`` decides between them: a tripped gate (3) takes precedence over an incomplete result
  (4), because the gate is what the user asked the exit status to tell; the JSON still says which
  matrices were left out.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import EXIT_GATE, EXIT_INCOMPLETE, EXIT_OK, LoraAuditError, OutputError
from ..text import printable


# Every command's context settings, also when a command object is invoked on its own (tests, other
# programs embedding it): click caches a command's help option the first time it is built, so a
# command that inherited "-h" only from the group would lose it after one direct invocation.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def echo(text: Any = "", *, err: bool = False) -> None:
    """click.echo with every control, bidi and invisible character shown as an escape."""
    click.echo(printable(text, multiline=True), err=err)


def allow_pickle_option(f):
    return click.option("--allow-pickle", is_flag=True,
                        help="Permit pytorch_model.bin checkpoints, read with torch.load(weights_only=True).")(f)


def task_dir_options(f):
    """--task-dir and --trust-task-code: a local lm-eval task folder, and the permission to run its
    code (``lora_audit.safety.task_code``)."""
    f = click.option("--trust-task-code", is_flag=True,
                     help="Let the --task-dir tasks run their code: !function imports, metric scripts, templates "
                          "rendered without the Jinja sandbox. Without it such a folder is refused.")(f)
    return click.option("--task-dir", type=click.Path(exists=True, file_okay=False), default=None,
                        help="Folder of local lm-eval task YAML files (templates rendered in a Jinja sandbox).")(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")(f)


def seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help="Random seed (results are reproducible).")(f)


def overwrite_option(f):
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing output folder, if an earlier lora-audit run wrote it "
                             "(folders lora-audit did not write are never replaced).")(f)


def file_path(ctx, param, value):
    """Click callback for an output file option: refuse a folder (usage error); the rest of the
    checks (writable, not replacing what the user owns) run in the command (``check_paths``)."""
    if value is not None and value != "-" and os.path.isdir(os.path.expanduser(value)):
        raise click.BadParameter(f"{value} is a folder; give a file name", ctx=ctx, param=param)
    return value


STDOUT_KEY = "lora_audit.stdout"  # ctx.meta: the real stdout while --json - sends the rest to stderr
VERBOSITY_KEY = "lora_audit.verbosity"  # ctx.meta (shared by the group's and the command's contexts)


def _reserve_stdout(ctx: click.Context) -> None:
    """From now until the command ends, stdout is the JSON's alone: what else is printed (summaries,
    gate lines, anything a library prints) goes to stderr."""
    if ctx.meta.get(STDOUT_KEY) is None:
        ctx.meta[STDOUT_KEY] = sys.stdout
        ctx.with_resource(contextlib.redirect_stdout(sys.stderr))


def _json_path(ctx, param, value):
    value = file_path(ctx, param, value)
    if value == "-":
        _reserve_stdout(ctx)
    return value


def json_option(what: str = "the result"):
    """``--json PATH|-``: the same meaning in every command (see the module docstring)."""
    return click.option("--json", "json_path", default=None, metavar="PATH|-", callback=_json_path,
                        help=f"Write {what} as JSON to PATH (atomically, after success); '-' prints it to stdout "
                             "and everything else to stderr.")


def sarif_option(f):
    return click.option("--sarif", "sarif_path", default=None, metavar="PATH", callback=file_path,
                        help="Write the findings as SARIF 2.1.0 to PATH, for code-scanning UIs (rule ids: "
                             "docs/cli.md).")(f)


def out_option(help: str, *, required: bool = False, folder: bool = True, default=None):
    """``-o/--out``: where the command's outputs go; a folder (``folder``) or a file."""
    if folder:
        return click.option("--out", "-o", "out", required=required, default=default,
                            type=click.Path(file_okay=False), metavar="FOLDER", help=help)
    return click.option("--out", "-o", "out", required=required, default=default, callback=file_path, metavar="PATH",
                        help=help)


def out_files(out, names: dict[str, str | None], given: dict[str, str | None]) -> dict[str, str | None]:
    """The output files of a command with ``-o/--out FOLDER``: an option given explicitly wins, else
    FOLDER/name for each output (``names``: option -> file name in the folder)."""
    if out is None:
        return dict(given)
    return {key: given.get(key) or str(Path(out) / name) for key, name in names.items()}  # type: ignore[operator]


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    flags = ctx.meta.setdefault(VERBOSITY_KEY, {"quiet": False, "verbose": False})
    flags[param.name] = flags[param.name] or bool(value)
    if flags["quiet"] and flags["verbose"]:
        raise click.UsageError("-q/--quiet and -v/--verbose contradict each other; give one of them", ctx=ctx)
    from ..progress import NORMAL, QUIET, VERBOSE, set_verbosity

    set_verbosity(QUIET if flags["quiet"] else VERBOSE if flags["verbose"] else NORMAL)


QUIET_HELP = "No progress bars, stage or heartbeat lines from any stage; the shortest summary."
VERBOSE_HELP = "Also show the libraries' own progress bars, logs and warnings (transformers, lm-eval, ...)."


_VERBOSITY_OPTS = ((("--quiet", "-q"), QUIET_HELP), (("--verbose", "-v"), VERBOSE_HELP))


def verbosity_params() -> list[click.Option]:
    """``-q/--quiet`` and ``-v/--verbose`` as click parameters (for commands built without the
    decorator, e.g. plugins: ``lora_audit.cli.LazyGroup`` adds them)."""
    return [click.Option(list(decls), is_flag=True, expose_value=False, callback=_verbosity, help=help)
            for decls, help in _VERBOSITY_OPTS]


def verbosity_options(f):
    """``-q/--quiet`` and ``-v/--verbose`` (see the module docstring); the command reads ``quiet()``."""
    for decls, help in reversed(_VERBOSITY_OPTS):
        f = click.option(*decls, is_flag=True, expose_value=False, callback=_verbosity, help=help)(f)
    return f


def has_verbosity_options(cmd: click.Command) -> bool:
    return any(getattr(p, "callback", None) is _verbosity for p in cmd.params)


def quiet() -> bool:
    """Whether -q was given (before or after the command name)."""
    from ..progress import is_quiet

    return is_quiet()


class GateOption(click.Option):
    """The ``--fail-on`` option; ``gate_fields``: the fields this command's gate accepts."""

    def __init__(self, *args, gate_fields=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_fields = dict(gate_fields or {})


def fail_on_option(*kinds: str, example: str | None = None):
    """``--fail-on EXPR`` over the fields of the given result kinds ("spectrum", "safety", "scan",
    "screen"), repeatable; the callback returns one ``results.gate.Gate`` combining every
    occurrence (or None). The help lists only these kinds' fields and an example that uses them."""
    from ..results.gate import GRAMMAR, fields_for, parse_gates

    fields = fields_for(*kinds)
    example = example or next(iter(fields)) + ">0"

    def parse(ctx, param, value):
        if not value:
            return None
        try:
            return parse_gates(value, fields)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None

    return click.option("--fail-on", "fail_on", cls=GateOption, gate_fields=fields, multiple=True, metavar="EXPR",
                        callback=parse,
                        help=f"Release gate: after writing the results, exit with status 3 when a condition holds "
                             f"for a tuned model. EXPR: {GRAMMAR}; repeatable (the gate trips when any condition "
                             f"of any --fail-on holds). Fields: {', '.join(fields)} (docs/cli.md). "
                             f"Example: '{example}'.")


def deprecated_alias(*decls: str, use: str, multiple: bool = False):
    """An old option spelling of what is now a positional argument (``--base`` for BASE): hidden from
    the help, still accepted, with a one-line deprecation warning on stderr saying what to type."""
    def warn(ctx, param, value):
        if value:
            echo(f"Warning: {param.opts[0]} is deprecated and will be removed; {use}", err=True)
        return value

    return click.option(*decls, hidden=True, multiple=multiple, default=None, metavar="PATH", callback=warn)


def fold_deprecated_aliases(kw: dict) -> None:
    """BASE and TUNED... in ``kw`` from the positional arguments and the deprecated ``--base`` /
    ``--tuned`` (``old_base``, ``old_tuned``; removed from ``kw``): with ``--base``, every positional
    argument is a TUNED; a command without TUNED (finetune) may not have BASE twice."""
    old_base, old_tuned = kw.pop("old_base", None), tuple(kw.pop("old_tuned", None) or ())
    if old_base is not None:
        if "tuned" in kw:
            kw["tuned"] = ((kw["base"],) if kw.get("base") is not None else ()) + tuple(kw["tuned"] or ())
        elif kw.get("base") is not None:
            raise click.UsageError(f"BASE given twice ({kw['base']} and --base {old_base}); give it once, as the "
                                   "argument")
        kw["base"] = old_base
    if old_tuned:
        kw["tuned"] = tuple(kw.get("tuned") or ()) + old_tuned


def report_gate(gate, outcomes, *, json_path: str | None) -> bool:
    """Print the gate's outcome (to stderr when the JSON goes to stdout); whether it tripped."""
    if gate is None:
        return False
    from ..results.gate import format_gate

    echo(format_gate(gate, outcomes), err=json_path == "-")
    return any(o.tripped for o in outcomes)


def chat_template_option(f):
    return click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Jinja chat template file, for models whose tokenizer has none.")(f)


def max_prompt_chars_option(f):
    return click.option("--max-prompt-chars", type=click.IntRange(min=1), default=None,
                        help="Refuse prompt files with a prompt longer than this [default: 16000 characters].")(f)


def k_option(f):
    return click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True,
                        help="How many top singular vectors of each tuned matrix to examine.")(f)


def epsilon_option(f):
    return click.option("--epsilon", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.5,
                        show_default=True,
                        help="Intruder threshold: a direction is an intruder if max |cos| < epsilon.")(f)


def check_paths(*, files: Iterable[str | os.PathLike | None] = (), folders: Iterable[str | os.PathLike | None] = (),
                inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> None:
    """Before any work: every output can be written without replacing something the user owns,
    none is an input or inside one, no two collide (``-``, stdout, is not a path)."""
    from ..io import check_output_dir, check_output_file, check_outputs

    files = [f for f in files if f is not None and str(f) != "-"]
    folders = [d for d in folders if d is not None]
    check_outputs(files, inputs, folders=folders)
    for f in files:
        check_output_file(f)  # type: ignore[arg-type]
    for d in folders:
        check_output_dir(d, overwrite=overwrite)  # type: ignore[arg-type]


def write_json_output(path: str | os.PathLike | None, obj: Any) -> Path | None:
    """Write a result JSON to ``path`` (``-``: stdout, the real one when ``--json -`` sent the rest
    of the output to stderr). When the write fails late (disk full, folder removed meanwhile), the
    result is kept in a temporary file and the error says where."""
    from ..io import atomic_write_json, json_text

    if path is None:
        return None
    data = obj.to_json() if hasattr(obj, "to_json") else obj
    if str(path) == "-":
        ctx = click.get_current_context(silent=True)
        stream = ctx.meta.get(STDOUT_KEY) if ctx is not None else None
        click.echo(json_text(data), nl=False, file=stream)
        return None
    try:
        return atomic_write_json(path, data)
    except OSError as e:
        fd, keep = tempfile.mkstemp(prefix="lora-audit-result.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json_text(data))
        raise OutputError(f"{path}: could not be written ({e.strerror or e}); the result was saved to {keep}") \
            from None


def exit_code(*, incomplete: bool = False, gate_tripped: bool = False) -> int:
    """The exit status results call for: 3 when the --fail-on gate tripped, else 4 when incomplete,
    else 0 (the gate takes precedence: see the module docstring)."""
    if gate_tripped:
        return EXIT_GATE
    return EXIT_INCOMPLETE if incomplete else EXIT_OK


def exit_status(*, incomplete: bool = False, gate_tripped: bool = False) -> None:
    """End the command with ``exit_code``'s status (nothing happens for 0)."""
    code = exit_code(incomplete=incomplete, gate_tripped=gate_tripped)
    if code != EXIT_OK:
        raise click.exceptions.Exit(code)


def user_errors(f):
    """Turn library errors into click errors so CliRunner sees exit code 1 and 'Error: ...'.

    (``lora_audit.cli.main`` does the same for the console script; CliRunner calls the
    commands without it.)
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except LoraAuditError as e:
            raise click.ClickException(printable(str(e), multiline=True)) from None
        except (RuntimeError, MemoryError) as e:
            from ..device import is_oom

            if is_oom(e):
                raise click.ClickException("out of memory on the device. Try --device cpu, a smaller "
                                           "--batch-size, or fewer models per run.") from None
            raise

    return wrapper


# ---- how models are loaded and which ones: shared by every command that loads or names models -------------
DTYPE_HELP = ("Load whole models in this dtype: auto (the checkpoint's own dtype on CUDA, float32 on the CPU), "
              "bfloat16, float16 or float32. Generation, scoring and training use it; the spectral numerics read the "
              "weight files themselves and stay in float32/float64 whatever it is.")


def _wrap(f, build):
    """``f`` called with the keyword arguments ``build(kw)`` rewrites; a library error in ``build``
    becomes a one-line click error (as ``user_errors``), before any model is loaded."""

    @functools.wraps(f)
    def wrapper(*args, **kw):
        try:
            build(kw)
        except LoraAuditError as e:
            raise click.ClickException(printable(str(e), multiline=True)) from None
        return f(*args, **kw)

    return wrapper


def model_loading_options(*, placement: bool = True, default_dtype: str = "auto"):
    """``--dtype`` (and with ``placement`` ``--device-map``, ``--load-in-4bit``, ``--load-in-8bit``),
    handed to the command as one ``load`` argument (``checkpoints.loading.LoadOptions``), checked
    against ``--device`` when the command is invoked."""
    from ..checkpoints.loading import DEVICE_MAPS, DTYPE_CHOICES

    def build(kw):
        from ..checkpoints.loading import LoadOptions

        q4, q8 = kw.pop("load_in_4bit", False), kw.pop("load_in_8bit", False)
        if q4 and q8:
            raise click.UsageError("--load-in-4bit and --load-in-8bit exclude each other")
        kw["load"] = LoadOptions(dtype=kw.pop("dtype"), device_map=kw.pop("device_map", None),
                                 quantization="4bit" if q4 else "8bit" if q8 else None)
        if "device" in kw:
            from ..device import resolve_device

            resolve_device(kw["device"])  # DeviceError first: before any model is looked up or loaded
        kw["load"].check(kw.get("device", "auto"))

    def deco(f):
        f = _wrap(f, build)
        if placement:
            f = click.option("--load-in-8bit", is_flag=True,
                             help="Quantise the weights to 8 bits as they load (bitsandbytes LLM.int8: CUDA, or the CPU "
                                  "where the installed bitsandbytes has a CPU backend). Adapters stay separate.")(f)
            f = click.option("--load-in-4bit", is_flag=True,
                             help="Quantise the weights to 4 bits (nf4) as they load (bitsandbytes: CUDA, or the CPU where "
                                  "it has a CPU backend), computing in --dtype. PEFT adapters are applied on top (never "
                                  "merged into the quantised weights); the weight audit reads the files.")(f)
            f = click.option("--device-map", type=click.Choice(DEVICE_MAPS), default=None,
                             help="Let accelerate place the layers: across every GPU, the rest offloaded to the CPU "
                                  "(for models larger than one device). Leave --device at auto.")(f)
        return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=default_dtype, show_default=True,
                            help=DTYPE_HELP)(f)

    return deco


def revision_option(f):
    """``--revision REV`` for BASE and TUNED (as ``ID@REV``), and BASE left out when every TUNED is
    an adapter that names its base (``checkpoints.hub.model_references``): the command gets the
    pinned references as ``base`` and ``tuned`` (``adapter`` for one adapter)."""

    def build(kw):
        from ..checkpoints.hub import model_references

        fold_deprecated_aliases(kw)  # --base / --tuned: before BASE is resolved
        revision = kw.pop("revision")
        if "adapter" not in kw and "tuned" not in kw:  # BASE only (finetune)
            from ..checkpoints.hub import apply_revision

            if kw.get("base") is None:
                raise click.UsageError("Missing argument 'BASE'.")
            kw["base"] = apply_revision([kw["base"]], revision)[0]
            return
        single = "adapter" in kw and "tuned" not in kw
        tuned = [kw["adapter"]] if single else list(kw.get("tuned") or ())
        if kw.get("base") is None and not tuned:
            raise click.UsageError("Missing argument 'BASE'.")
        if single and kw.get("adapter") is None:  # "mitigate ADAPTER": BASE left out
            tuned, kw["base"] = [kw["base"]], None
        base, tuned, derived = model_references(kw.get("base"), tuned, revision)
        _require_tuned(tuned)
        kw["base"] = base
        if single:
            kw["adapter"] = tuned[0]
        else:
            kw["tuned"] = tuple(tuned)
        if derived:
            echo(f"BASE {base} (named by the adapter_config.json of {tuned[0]})", err=True)

    return click.option("--revision", default=None, metavar="REV",
                        help="Pin every Hugging Face hub id given without @REV to this branch, tag or commit "
                             "(ORG/NAME@REV pins one). The resolved commit sha is recorded in the results; with "
                             "HF_HUB_OFFLINE=1 the local cache's snapshot of it is used.")(_wrap(f, build))


def _require_tuned(tuned) -> None:
    """A command whose TUNED is a positional argument needs one (BASE alone is not an adapter naming its
    base): click's own usage error, as before BASE could be left out. safety-eval measures BASE alone
    (its TUNED is optional: shown as ``[TUNED]...``)."""
    ctx = click.get_current_context()
    param = next((p for p in ctx.command.params if p.name in ("tuned", "adapter")), None)
    optional = isinstance(param, click.Argument) and str(param.metavar or "").startswith("[")
    if not tuned and isinstance(param, click.Argument) and not optional:
        raise click.MissingParameter(ctx=ctx, param=param)


def lm_eval_options(f):
    """lm-eval's own options for the capability tasks, with lm-eval's meanings, handed to the
    command as one ``lm_eval`` argument (``safety.lmeval.LmEvalOptions``)."""

    def build(kw):
        from ..safety.lmeval import LmEvalOptions, parse_args_string

        kw["lm_eval"] = LmEvalOptions(num_fewshot=kw.pop("num_fewshot"),
                                      apply_chat_template=kw.pop("apply_chat_template") or False,
                                      fewshot_as_multiturn=kw.pop("fewshot_as_multiturn"),
                                      gen_kwargs=parse_args_string(kw.pop("gen_kwargs"), "--gen-kwargs"),
                                      model_args=parse_args_string(kw.pop("model_args"), "--model-args"))

    f = _wrap(f, build)
    for opt in reversed([
        click.option("--num-fewshot", type=click.IntRange(0), default=None,
                     help="lm-eval: few-shot examples per task item [default: each task's own]."),
        click.option("--apply-chat-template", is_flag=True, default=False,
                     help="lm-eval: format the task prompts with the tokenizer's chat template."),
        click.option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", default=None,
                     help="lm-eval: few-shot examples as conversation turns [default: on with --apply-chat-template]."),
        click.option("--gen-kwargs", default=None, metavar="K=V,...",
                     help="lm-eval: generation arguments of generate_until tasks, e.g. 'max_gen_toks=256,temperature=0'."),
        click.option("--model-args", default=None, metavar="K=V,...",
                     help="lm-eval: further HFLM arguments, merged with lora-audit's own (pretrained, tokenizer, "
                          "batch size, device: a key naming one of those is an error), e.g. 'max_length=2048'."),
    ]):
        f = opt(f)
    return f
