"""A local lm-eval task folder (``--task-dir``) is code: what lora-audit checks before lm-eval loads
one, and how the tasks' templates are rendered.

lm-eval (lm-evaluation-harness 0.4.x) runs Python from a task folder in several ways:

- a ``!function module.name`` YAML tag imports ``module.py`` next to the YAML and calls it
  (process_docs, doc_to_text, process_results, filters, metrics, ``class``, custom datasets);
- a metric it does not know (or ``hf_evaluate: true``) is loaded with Hugging Face
  ``evaluate.load``, which runs a metric script from a local path or from the hub;
- ``use_prompt`` reads prompt templates from any YAML file or from promptsource;
- ``dataset_kwargs: {trust_remote_code: true}`` lets ``datasets`` run a loading script (versions < 4);
- its Jinja templates (doc_to_text, doc_to_target, doc_to_choice, ...) are rendered by a plain
  ``jinja2.Environment`` (``lm_eval.utils.env``), where
  ``{{ cycler.__init__.__globals__.os.system('...') }}`` runs a command.

``inspect_task_dir`` reads every task YAML of the folder as lm-eval finds them (``**/*.yaml``, and
the files they ``include:``), with a safe YAML loader that records ``!function`` instead of running
it, and lists every use of code above, plus templates that reach for Python internals (names
starting with ``_``, the attributes a Jinja sandbox refuses, methods that mutate), YAML files and
includes that lie outside the folder (links), and dataset files that are FIFOs or devices (reading
them would never end). Without ``trust`` (``--trust-task-code``) a folder with any use of code is
refused, naming the files and uses, before any model is loaded.

``task_code_guard`` wraps lm-eval's evaluation: without ``trust``, every task template is rendered in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (the same filters as lm-eval's environment), and a
``!function`` outside lm-eval's own package is refused; a template the sandbox refuses while
rendering is an ``InputError`` naming ``--trust-task-code``. So a template in an untrusted folder
cannot run code or reach Python objects; it can still be slow (rendering has no time limit).
lm-eval's own tasks (named without --task-dir) are installed code and are loaded as lm-eval loads them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from ..errors import FormatError, InputError
from ..io import check_regular_file, file_kind, read_user_bytes, user_path
from ..text import printable

TRUST_OPTION = "--trust-task-code"
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm_eval.tasks._index
MAX_USES_SHOWN = 8
# A string constant that spells a private name ("__init__", "_", "__") or a format field reaching for
# one ("{0.__class__}", "{x[_y]}"): the pieces of an attribute lookup assembled at render time.
_SUSPECT_STRING = re.compile(r"^_+$|^__\w+__$|[.\[]_")
# Methods that change a list, dict or set in place: ImmutableSandboxedEnvironment refuses them.
_MUTATING = frozenset({"append", "extend", "insert", "pop", "popitem", "remove", "clear", "reverse", "sort",
                       "update", "setdefault", "add", "discard", "difference_update", "intersection_update",
                       "symmetric_difference_update"})


@dataclass(frozen=True)
class _Function:
    """A ``!function`` tag as the safe loader records it (lm-eval would import and call it)."""

    spec: str


@dataclass
class TaskDirReport:
    """What ``inspect_task_dir`` found: the YAML files read and every use of code (file, what)."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    uses: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def runs_code(self) -> bool:
        return bool(self.uses)


def _loader_class():
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):
        pass

    def function(loader, node):
        return _Function(str(loader.construct_scalar(node)))

    Loader.add_constructor("!function", function)
    return Loader


def _load(path: Path) -> Any:
    """A task YAML file, loaded safely (``!function`` recorded as ``_Function``); FormatError when it
    is not YAML this loader reads (lm-eval would construct Python objects from other tags)."""
    import yaml

    data = read_user_bytes(path, "task YAML file")
    try:
        return yaml.load(data, Loader=_loader_class())  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FormatError(f"{path}: {where}not a task YAML lora-audit can check ({printable(problem)}); fix it, move "
                          f"it out of the task folder, or pass {TRUST_OPTION} to let lm-eval load it") from None
    except RecursionError:
        raise FormatError(f"{path}: nested too deeply to be a task YAML") from None


def _walk(obj: Any) -> Iterator[tuple[tuple, Any]]:
    """(key path, value) of every node of a loaded YAML tree; each container once (YAML aliases
    share nodes, and a billion-laughs file must not be walked a billion times)."""
    seen: set[int] = set()
    stack: list[tuple[tuple, Any]] = [((), obj)]
    while stack:
        keys, node = stack.pop()
        yield keys, node
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((keys + (k,), v) for k, v in items)


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def template_problems(text: str) -> list[str]:
    """What in the Jinja template ``text`` a sandbox would refuse or that reaches for Python internals:
    attribute or item names starting with ``_`` or in Jinja's unsafe sets, methods that mutate, and
    string constants that spell such a name or a format field reaching for one (``'{0.__class__}'``).
    A static check (it flags none of the 4,056 templates of lm-eval 0.4.13's own tasks): the
    sandbox that renders the templates (``task_code_guard``) is what guarantees the rest."""
    from jinja2 import TemplateSyntaxError, nodes, sandbox

    try:
        tree = sandbox_environment().parse(text)
    except TemplateSyntaxError:
        return []  # lm-eval cannot render it either; it says so when it tries
    unsafe = (sandbox.UNSAFE_FUNCTION_ATTRIBUTES | sandbox.UNSAFE_METHOD_ATTRIBUTES | sandbox.UNSAFE_GENERATOR_ATTRIBUTES
              | sandbox.UNSAFE_COROUTINE_ATTRIBUTES | sandbox.UNSAFE_ASYNC_GENERATOR_ATTRIBUTES | _MUTATING)
    found = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Const)):
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            name = node.args[0].value
        elif isinstance(node, nodes.Const) and isinstance(node.value, str) and _SUSPECT_STRING.search(node.value):
            found.append(f"the string {node.value!r}")
            continue
        if isinstance(name, str) and (name.startswith("_") or name in unsafe):
            found.append(f".{name}")
    return sorted(set(found))


def _uses_in(cfg: Any, yaml_path: Path) -> list[str]:
    """Every use of code in one loaded task YAML (see the module docstring)."""
    from lm_eval.prompts import PROMPT_REGISTRY

    uses = []
    for keys, node in _walk(cfg):
        where = ".".join(str(k) for k in keys) or "(top)"
        if isinstance(node, _Function):
            module = node.spec.rpartition(".")[0]
            uses.append(f"{where}: !function {node.spec} (imports and runs {module.replace('.', '/')}.py)")
        elif isinstance(node, str) and _is_template(node):
            bad = template_problems(node)
            if bad:
                uses.append(f"{where}: a template using {', '.join(bad)}, which a Jinja sandbox refuses "
                            "(Python internals)")
        if not isinstance(node, dict):
            continue
        if "class" in node:
            uses.append(f"{where}: class (a task written in Python)")
        prompt = node.get("use_prompt")
        if isinstance(prompt, str) and prompt.split(":", 1)[0] not in PROMPT_REGISTRY:
            uses.append(f"{where}.use_prompt: {prompt} (templates read from another file or promptsource)")
        kwargs = node.get("dataset_kwargs")
        if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
            uses.append(f"{where}.dataset_kwargs.trust_remote_code (runs the dataset's loading script)")
        metrics = node.get("metric_list")
        for m in metrics if isinstance(metrics, list) else []:
            if isinstance(m, dict) and isinstance(m.get("metric"), str) and (
                    m.get("hf_evaluate") is True or not _known_metric(m["metric"])):
                uses.append(f"{where}.metric_list: metric {m['metric']} (loaded with evaluate.load, which runs "
                            "a metric script)")
        if isinstance(kwargs, dict):
            _check_data_files(kwargs.get("data_files"), yaml_path)
        if isinstance(node.get("dataset_path"), str):
            _check_data_files(node["dataset_path"], yaml_path)
    return uses


def _known_metric(name: str) -> bool:
    """Whether lm-eval computes the metric ``name`` itself (else it asks Hugging Face evaluate)."""
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's metrics
    from lm_eval.api import registry

    return name in getattr(registry, "metric_registry", getattr(registry, "METRIC_REGISTRY", {}))


def _check_data_files(files: Any, yaml_path: Path) -> None:
    """InputError when a dataset file the task names is a FIFO or a device (reading it never ends)."""
    if isinstance(files, dict):
        files = list(files.values())
    for f in files if isinstance(files, list) else [files]:
        if isinstance(f, list):
            _check_data_files(f, yaml_path)
        elif isinstance(f, str):
            try:
                mode = os.stat(f).st_mode
            except (OSError, ValueError):
                continue  # absent, a hub id, a glob pattern or a URL: datasets says what it cannot find
            special = [f] if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) else []
            if stat.S_ISDIR(mode):  # datasets reads the files under a folder
                special = [str(p) for p in itertools.islice(Path(f).rglob("*"), 10_000)
                           if not (p.is_file() or p.is_dir()) and p.exists()][:1]
            if special:
                mode = os.stat(special[0]).st_mode
                raise InputError(f"{yaml_path}: dataset file {printable(special[0])} is a {file_kind(mode)}, not a "
                                 "file to read")


def _includes(cfg: dict, path: Path) -> list[Path]:
    """The files ``cfg``'s ``include:`` names, resolved as lm-eval resolves them (relative to the
    real folder of ``path``)."""
    inc = cfg.get("include")
    if inc is None:
        return []
    out = []
    for name in inc if isinstance(inc, list) else [inc]:
        if not isinstance(name, str) or not name:
            raise FormatError(f"{path}: include must name YAML files, got {printable(repr(name))}")
        p = Path(name)
        out.append(p if p.is_absolute() else path.parent / p)
    return out


def inspect_task_dir(task_dir: str | os.PathLike, *, trust: bool = False) -> TaskDirReport:
    """Read the task folder ``task_dir`` safely and list its uses of code (module docstring).

    Raises InputError when it uses code and ``trust`` is False (naming the files, the uses and
    ``--trust-task-code``), when it is not a folder, or when a file it names is a FIFO or a
    device; FormatError for a YAML file the safe loader cannot read (unless ``trust``)."""
    root = user_path(task_dir)
    if not root.is_dir():
        raise InputError(f"{task_dir}: --task-dir must be a folder of lm-eval task YAML files")
    real_root = root.resolve()
    report = TaskDirReport(folder=root)
    pending = sorted((p for p in root.glob("**/*.yaml") if not any(part in _IGNORE_DIRS for part in p.parts)),
                     key=lambda p: p.as_posix())
    done: set[Path] = set()
    while pending:
        given = pending.pop(0)
        if given.is_dir():
            continue  # a folder named *.yaml: lm-eval skips it too
        check_regular_file(given, "task YAML file")
        path = given.resolve()
        if path in done:
            continue
        done.add(path)
        report.files.append(path)
        if not path.is_relative_to(real_root):
            report.uses.append((given, f"{path}, outside the task folder (a link or an include)"))
        try:
            cfg = _load(path)
        except FormatError:
            if trust:
                continue
            raise
        if not isinstance(cfg, dict):
            continue  # lm-eval skips it too
        report.uses += [(path, use) for use in _uses_in(cfg, path)]
        pending += _includes(cfg, path)
    if report.uses and not trust:
        shown = [f"  {printable(p)}: {printable(use)}" for p, use in report.uses[:MAX_USES_SHOWN]]
        more = len(report.uses) - len(shown)
        raise InputError(f"{task_dir}: this lm-eval task folder runs code (lm-eval would execute it with your "
                         f"rights):\n" + "\n".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
                         + f"\nReview the folder; if you trust it, pass {TRUST_OPTION}")
    return report


def sandbox_environment():
    """The Jinja environment task templates are rendered in without ``--trust-task-code``: lm-eval's
    own settings (StrictUndefined, trailing newlines kept, its extra filters) in
    ``ImmutableSandboxedEnvironment``."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
    with contextlib.suppress(ImportError):
        from lm_eval import utils

        env.filters.update({k: v for k, v in utils.env.filters.items() if k not in env.filters})
    return env


def _lm_eval_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent


@contextlib.contextmanager
def task_code_guard(trust: bool) -> Iterator[None]:
    """While lm-eval evaluates: unless ``trust``, task templates render in ``sandbox_environment`` and
    ``!function`` imports outside lm-eval's package are refused (InputError naming --trust-task-code).
    Everything is restored afterwards."""
    if trust:
        yield
        return
    import lm_eval.utils as lm_utils

    patches: list[tuple[Any, str, Any]] = [(lm_utils, "env", sandbox_environment())]
    try:
        import lm_eval.tasks._yaml_loader as yl
    except ImportError:  # older lm-eval: lm_eval.utils.import_function
        yl = None
    if yl is not None and hasattr(yl, "_import_func_in_yml"):
        patches.append((yl, "_import_func_in_yml", _guarded(yl._import_func_in_yml)))
    if hasattr(lm_utils, "import_function"):
        patches.append((lm_utils, "import_function", _guarded_legacy(lm_utils.import_function)))
    old = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, new in patches:
        setattr(mod, name, new)
    try:
        yield
    finally:
        for mod, name, value in old:
            setattr(mod, name, value)


def _refuse_function(spec: str, base_dir: Path) -> None:
    if not Path(base_dir).resolve().is_relative_to(_lm_eval_dir()):
        raise InputError(f"{base_dir}: a task YAML there asks lm-eval to import and run !function {printable(spec)}; "
                         f"lora-audit does not run a task folder's code without {TRUST_OPTION}")


def _guarded(real):
    def import_func(qual: str, base_dir: Path):
        _refuse_function(qual, base_dir)
        return real(qual, base_dir)

    return import_func


def _guarded_legacy(real):
    def import_function(loader, node, yaml_path: Path):
        _refuse_function(str(loader.construct_scalar(node)), Path(yaml_path).parent)
        return real(loader, node, yaml_path=yaml_path)

    return import_function


def template_error(e: Exception) -> InputError | None:
    """The InputError for a Jinja error raised while lm-eval rendered a task template (None for
    other errors): a template the sandbox refused names --trust-task-code."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    if isinstance(e, SecurityError):
        return InputError(f"a task template does something the Jinja sandbox refuses ({printable(e)}); lora-audit "
                          f"renders a task folder's templates sandboxed unless you pass {TRUST_OPTION}")
    if isinstance(e, TemplateError):
        return InputError(f"a task template cannot be rendered ({type(e).__name__}: {printable(e)})")
    return None
