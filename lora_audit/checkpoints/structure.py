"""Structural checks of a TUNED input: red flags found from its file listing, configs and
safetensors headers alone, before any matrix is read (no tensor data but a kohya adapter's alphas,
nothing executed; LA020 hashes the two base models when it compares them).

    findings = check_structure("adapter/", base="base/")   # [results.findings.Finding, ...]

Each finding carries a rule id of ``lora_audit.results.findings.RULES``:

- LA020 base-mismatch: adapter_config.json's ``base_model_name_or_path`` differs from BASE (paths
  compared resolved, hub ids as strings, a hub id also through its local Hugging Face cache copy; a
  relative path not found from the current folder is looked up next to the adapter folder).
  When the named base is on this machine both are fingerprinted (``results.fingerprint``, by
  content up to ``COMPARE_CONTENT_BYTES``): same content is a note, different files a warning.
- LA021 full-matrix-in-adapter: ``modules_to_save`` replacements (full embedding / lm_head
  matrices: warning; other matrices: note) and LoRA factors of rank >= min(rows, cols).
- LA022 moe-router-adapted: LoRA or a replacement on a mixture-of-experts router (``is_router``).
- LA023 rank-mismatch: declared r / rank_pattern vs the ranks of the lora_A tensors (error: PEFT
  cannot load it; ``read_adapter`` records it and the audit uses the tensors' rank), and
  rank_pattern keys that match no module.
- LA024 target-modules-mismatch: modules with weights that target_modules (or, when the config has
  none, PEFT's default for the base's model type) does not select: PEFT ignores their weights, and
  so does the audit (``adapters.ignored_modules``); an absent target_modules; targets without
  weights (they keep their initialisation).
- LA025 executable-file: pickle and Python files in a TUNED folder.
- LA026 custom-code-reference: ``auto_map`` / ``auto_mapping`` in its configs.
- LA027 scale-anomaly: alpha / r (alpha / sqrt(r) with rsLoRA) <= 0 or above ``SCALE_HIGH``.
- LA028 dtype-anomaly: factors in several dtypes, or in float64 / float8.

PEFT's matching rules are mirrored in ``adapters`` rather than imported (importing peft takes
seconds): ``pattern_key`` is ``peft.utils.other.get_pattern_key``, ``_targeted`` is
``peft.tuners.tuners_utils.check_target_module_exists`` and ``PEFT_DEFAULT_TARGETS`` peft's default
target modules; the tests compare them with peft's.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..io import read_user_json, user_path
from ..results.findings import Finding
from ..text import printable
from .adapter_sets import is_adapter_set, read_adapter_set
from .adapters import (_shown, _targeted, AdapterFile, ignored_modules, pattern_key, peft_targets,  # noqa: F401
                       read_adapter, read_adapter_config)
from .detect import Kind
from .hub import named_ref
from .sources import local_path
from .stream import is_embedding, is_head

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CODE_SUFFIXES = (".py", ".pyc")
CONFIG_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "processor_config.json",
                "preprocessor_config.json", "generation_config.json")
MAX_LISTED = 10_000  # folder entries looked at (a hostile folder may hold millions)
# Module names of mixture-of-experts routers in transformers: Mixtral / Qwen-MoE / OLMoE / DeepSeek
# ".mlp.gate" or ".block_sparse_moe.gate", Qwen's ".shared_expert_gate", Switch / DBRX / Jamba / GPT-OSS
# ".router" (".router.classifier", ".router.layer"). "gate_proj" is a dense MLP's gate, not a router.
ROUTER_MODULES = ("gate", "shared_expert_gate")  # the module's own name
ROUTER_PARENT = "router"  # any component of the name
SCALE_HIGH = 16.0  # 8x the largest common recipe (alpha = 2r): see RULES["LA027"]
COMPARE_CONTENT_BYTES = 2 * 2**30  # base models up to this size are compared by content (LA020)
SHOWN = 5  # names listed in a message


def check_structure(tuned: str | os.PathLike, *, base: str | os.PathLike | None = None,
                    base_config: dict | None = None) -> list[Finding]:
    """The structural findings of one TUNED input (an adapter folder or file, or a full model),
    optionally against the BASE it is audited with (``base_config``: its config as the loader reads
    it, e.g. a GGUF's; default: a BASE folder's config.json). Reads headers and configs only (and,
    when the adapter names another base that is on this machine, the files of both bases to compare
    them); raises the loaders' InputError / FormatError for inputs that cannot be read at all."""
    path, kind = local_path(tuned)
    findings = _folder_findings(path) if path.is_dir() else []
    if kind == Kind.PEFT_ADAPTER and is_adapter_set(path):  # MixLoRA / X-LoRA: each member's factors
        for member in read_adapter_set(path).members.values():
            findings += adapter_findings(member)
        return findings
    if kind == Kind.PEFT_ADAPTER:
        config = read_adapter_config(path)
        if base is not None:
            findings += _base_mismatch(path, config, base)
    if kind in (Kind.PEFT_ADAPTER, Kind.KOHYA_LORA, Kind.DIFFUSERS_LORA):
        findings += adapter_findings(read_adapter(path), base_config=base_config or _base_config(base))
    return findings


def _base_config(base: str | os.PathLike | None) -> dict | None:
    """The config.json of a local BASE folder (for PEFT's default target modules), else None."""
    folder = Path(str(base)).expanduser() if base is not None else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return read_user_json(folder / "config.json", "model config")
    except InputError:
        return None


def _listing(names: list[str], shown: int = SHOWN) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(printable(n) for n in names[:shown]) + more


# ---- files next to the weights -------------------------------------------------------------------
def _folder_findings(folder: Path) -> list[Finding]:
    """LA025 for pickle and Python files anywhere in ``folder`` (symlinked folders not followed),
    LA026 for configs at its top that make loaders import code."""
    out, seen = [], 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            if seen > MAX_LISTED:
                out.append(Finding("LA025", "note", f"more than {MAX_LISTED} files: the rest were not checked",
                                   str(folder)))
                return out + _config_findings(folder)
            p = Path(root) / name
            suffix = p.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                out.append(Finding("LA025", "warning", f"{printable(p.relative_to(folder))}: a pickle file; loading "
                                   "it with pickle or torch.load(weights_only=False) runs the code it holds", str(p),
                                   {"kind": "pickle"}))
            elif suffix in CODE_SUFFIXES:
                out.append(Finding("LA025", "warning", f"{printable(p.relative_to(folder))}: Python code; "
                                   "transformers runs such files with trust_remote_code", str(p),
                                   {"kind": "python"}))
    return out + _config_findings(folder)


def _config_findings(folder: Path) -> list[Finding]:
    out = []
    for name in CONFIG_FILES:
        p = folder / name
        if not p.exists():
            continue
        try:
            obj = read_user_json(p, "config")
        except InputError as e:
            out.append(Finding("LA026", "note", f"{name}: not checked for code references ({e})", str(p)))
            continue
        for key, refs in _code_references(obj).items():
            out.append(Finding("LA026", "warning", f"{name}: {key} names code to import when the model is "
                               f"loaded: {_listing(refs)}", str(p), {"key": key, "references": refs}))
    return out


def _code_references(config: dict) -> dict[str, list[str]]:
    """Config fields that make a loader import code: transformers' ``auto_map`` (classes run with
    trust_remote_code), PEFT's ``auto_mapping`` when its ``parent_library`` is not a transformers
    module (AutoPeftModel imports it), and ``megatron_core`` when a ``megatron_config`` is set."""
    refs = {}
    if config.get("auto_map"):
        refs["auto_map"] = sorted(set(_strings(config["auto_map"])))
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict) and not str(mapping.get("parent_library", "")).startswith("transformers."):
        refs["auto_mapping"] = sorted(set(_strings(mapping)))
    if config.get("megatron_config") and config.get("megatron_core"):
        refs["megatron_core"] = [str(config["megatron_core"])]
    return refs


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)] if value is not None else []


# ---- the base the adapter names -----------------------------------------------------------------------
def _local_model(name: str) -> Path | None:
    """A model named by path or hub id, as a resolved local folder or file: the path when it exists,
    else the hub id's snapshot in the local Hugging Face cache (never downloaded here)."""
    p = user_path(name)
    if p.exists():
        return p.resolve()
    from .hub import cached_snapshot

    cached = cached_snapshot(name)  # ORG/NAME[@REV]: the pinned snapshot this run resolved, else the cache's
    return cached.resolve() if cached is not None else None


def _base_mismatch(folder: Path, config: dict, base: str | os.PathLike) -> list[Finding]:
    from ..results import fingerprint

    named, given = named_ref(config), str(base)  # pinned to the adapter's recorded revision, if any
    if not named or named == given:
        return []
    named_local, base_local = _local_model(named), _local_model(given)
    if named_local is None and not Path(named).is_absolute() and (folder.parent / named).exists():
        named_local = (folder.parent / named).resolve()  # relative to where training ran, next to the adapter
    if named_local is not None and named_local == base_local:
        return []
    where = str(folder / "adapter_config.json")
    head = (f"adapter_config.json names base_model_name_or_path {printable(named)!r}, but the audit's BASE is "
            f"{printable(given)!r}")
    detail = {"named_base": named, "base": given, "named_base_found": str(named_local) if named_local else None}
    if named_local is None or base_local is None:
        missing = printable(named if named_local is None else given)
        return [Finding("LA020", "warning", f"{head}; {missing!r} is not on this machine, so the two were not "
                        "compared", where, detail)]
    fa = fingerprint(named_local, content_limit=COMPARE_CONTENT_BYTES)
    fb = fingerprint(base_local, content_limit=COMPARE_CONTENT_BYTES)
    detail.update(named_fingerprint=fa, base_fingerprint=fb)
    if fa == fb:
        return [Finding("LA020", "note", f"{head}: another copy with the same files ({fa})", where, detail)]
    if fa.startswith("sha256:") and fb.startswith("sha256:"):
        return [Finding("LA020", "warning", f"{head}: their files differ ({fa} vs {fb}); the adapter is audited "
                        "against another model than the one it names", where, detail)]
    return [Finding("LA020", "warning", f"{head}: both exist here but are larger than "
                    f"{COMPARE_CONTENT_BYTES // 2**30} GiB, so they were not compared by content", where, detail)]


# ---- declared and actual ranks -------------------------------------------------------------------------
def _rank_findings(af: AdapterFile, where: str) -> list[Finding]:
    """LA023 from the ranks ``read_adapter`` found (``AdapterFile.rank_mismatches``: the reader
    audits such modules with their tensors' rank), and rank_pattern keys that match no module."""
    out = []
    bad = af.rank_mismatches
    if bad:
        out.append(Finding("LA023", "error", f"{len(bad)} module(s) disagree with the declared rank, so PEFT cannot "
                           "load the adapter as declared (audited with the tensors' rank): " + "; ".join(bad[:SHOWN])
                           + (f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""), where,
                           {"mismatches": bad}))
    patterns = list(af.config.get("rank_pattern") or {})
    used = {pattern_key(patterns, m, where) for m in af.modules}
    unused = [k for k in patterns if k not in used]
    if af.modules and unused:
        out.append(Finding("LA023", "note", f"rank_pattern keys that match no module of the adapter: "
                           f"{_listing(unused)}", where, {"unused_rank_pattern": unused}))
    return out


# ---- what the adapter changes --------------------------------------------------------------------------
def adapter_findings(af: AdapterFile, base_config: dict | None = None) -> list[Finding]:
    """LA021 to LA024, LA027 and LA028 of a read adapter (headers and config only); ``base_config``:
    the BASE's config.json when known (PEFT's default target modules depend on its model type)."""
    weights = str(Path(af.path) / "adapter_model.safetensors") if af.kind == "peft_adapter" else af.path
    config = str(Path(af.path) / "adapter_config.json") if af.kind == "peft_adapter" else af.path
    out = _full_matrices(af, weights) + _routers(af, weights) + _rank_findings(af, config)
    if af.kind == "peft_adapter":
        out += _targets(af, config, base_config)
    return out + _scales(af, config) + _dtypes(af, weights)


def _full_matrices(af: AdapterFile, where: str) -> list[Finding]:
    out = []
    for pname, key in sorted(af.replacements.items()):
        shape = af.tensor_shape(key)
        if len(shape) < 2:
            continue
        token = is_embedding(pname) or is_head(pname)
        what = "token embedding / output head" if token else "matrix"
        out.append(Finding("LA021", "warning" if token else "note",
                           f"modules_to_save: the full {'x'.join(map(str, shape))} {what} {printable(pname)} is "
                           "shipped in the adapter (a full fine-tune of it, not a low-rank update)", where,
                           {"modules": [pname], "shape": list(shape), "source": "modules_to_save"}))
    full = sorted(m for m, (rows, cols, r) in af.shapes.items() if r >= min(rows, cols))
    if full:
        out.append(Finding("LA021", "warning", f"{len(full)} module(s) with LoRA factors of full rank (r >= "
                           f"min(rows, cols)), able to encode any update: {_listing(full)}", where,
                           {"modules": full, "source": "full_rank_factors"}))
    return out


def is_router(name: str) -> bool:
    """Whether a module or parameter name is a mixture-of-experts router (``ROUTER_MODULES``,
    ``ROUTER_PARENT``)."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return bool(parts) and (parts[-1] in ROUTER_MODULES or ROUTER_PARENT in parts)


def _routers(af: AdapterFile, where: str) -> list[Finding]:
    hits = sorted(m for m in list(af.modules) + list(af.replacements) if is_router(m))
    if not hits:
        return []
    return [Finding("LA022", "warning", f"{len(hits)} mixture-of-experts router(s) adapted: {_listing(hits)}; this "
                    "changes which experts every token is sent to", where, {"modules": hits})]


# ---- declared target modules ---------------------------------------------------------------------------
def _targets(af: AdapterFile, where: str, base_config: dict | None) -> list[Finding]:
    """LA024: weights PEFT ignores (``adapters.ignored_modules``: target_modules, or PEFT's default for
    the base's model type when the config has none, does not select them; not audited), an absent
    target_modules, and targets without weights."""
    config, declared = af.config, af.config.get("target_modules")
    model_type = (base_config or {}).get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    targets = peft_targets(config, model_type)
    out = []
    if declared is None and not config.get("target_parameters"):
        if targets is not None:
            out.append(Finding("LA024", "note", f"adapter_config.json has no target_modules: PEFT applies its default "
                               f"for the base's model type {printable(model_type)!r}, {_shown(targets)}", where,
                               {"default_targets": targets, "model_type": model_type}))
        elif model_type is not None:
            out.append(Finding("LA024", "warning", "adapter_config.json has no target_modules (nor target_parameters) "
                               f"and PEFT has no default for the base's model type {printable(model_type)!r}: PEFT "
                               "refuses to load this adapter; lora-audit audits every module with weights", where,
                               {"model_type": model_type}))
        else:
            out.append(Finding("LA024", "note", "adapter_config.json has no target_modules: PEFT applies its default "
                               "for the base's model type (e.g. q_proj, v_proj for Llama), which was not checked "
                               "without the base's config.json", where))
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return out  # every linear layer but the output one: needs the model to check
    ignored = sorted(ignored_modules(af, model_type))
    if ignored:
        which = "target_modules does" if declared is not None else "PEFT's default target_modules do"
        out.append(Finding("LA024", "warning", f"{len(ignored)} module(s) have LoRA weights that {which} not select, "
                           f"so PEFT ignores them and they are not audited (reported in info.skipped): "
                           f"{_listing(ignored)}", where, {"modules": ignored}))
    if isinstance(targets, list):
        absent = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in af.modules)]
        if absent:
            random_init = config.get("init_lora_weights") is False
            effect = ("random weights (init_lora_weights is false)" if random_init
                      else "their initial weights (B = 0: no change)")
            out.append(Finding("LA024", "warning" if random_init else "note",
                               f"target_modules entries without weights in the adapter: {_listing(absent)}; if the "
                               f"base has such modules, PEFT gives them {effect}", where, {"absent_targets": absent}))
    return out


# ---- scale and dtypes -----------------------------------------------------------------------------------
def _scales(af: AdapterFile, where: str) -> list[Finding]:
    """LA027: one finding per anomalous scale value, naming the modules that have it."""
    by_scale: dict[float, list[str]] = {}
    for module, s in af.scales.items():
        if s <= 0 or s > SCALE_HIGH:
            by_scale.setdefault(s, []).append(module)
    out = []
    for s, modules in sorted(by_scale.items()):
        modules.sort()
        effect = ("switches the update off" if s == 0 else "reverses the update" if s < 0
                  else f"amplifies the update more than {SCALE_HIGH:g}x")
        c = af.config
        declared = "" if af.kind != "peft_adapter" else (f" (lora_alpha {c.get('lora_alpha')}, r {c.get('r')}"
                                                         + (", rsLoRA" if c.get("use_rslora") else "") + ")")
        out.append(Finding("LA027", "warning", f"scale {s:g}{declared} on {len(modules)} module(s): it {effect}; "
                           f"usual recipes give 0.25 to 2: {_listing(modules)}", where,
                           {"scale": s, "modules": modules}))
    return out


def _dtypes(af: AdapterFile, where: str) -> list[Finding]:
    dtypes: dict[str, list[str]] = {}
    for module, f in af.modules.items():
        for key in (f.A, f.B):
            dtypes.setdefault(af.tensor_dtype(key), []).append(module)  # type: ignore[arg-type]
    out = []
    if len(dtypes) > 1:
        counts = ", ".join(f"{d} ({len(set(m))} modules)" for d, m in sorted(dtypes.items()))
        out.append(Finding("LA028", "note", f"factors in {len(dtypes)} dtypes: {counts}", where,
                           {"dtypes": sorted(dtypes)}))
    odd = sorted(d for d in dtypes if d == "F64" or d.startswith("F8"))
    if odd:
        out.append(Finding("LA028", "note", f"factors stored as {', '.join(odd)}, unusual for adapters (float16, "
                           "bfloat16 or float32 are the norm)", where, {"dtypes": odd}))
    return out
