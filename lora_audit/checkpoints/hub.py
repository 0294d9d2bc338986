"""Hugging Face hub references: ``ORG/NAME``, ``ORG/NAME@REVISION``, pinned to one commit per run.

A reference is a hub id only when it has no path syntax (``./``, ``/``, ``~``, a backslash, a
trailing ``/``, more than one ``/``, a weight-file suffix, or a first part that is a local folder)
and huggingface_hub's own ``validate_repo_id`` accepts it; anything else that does not exist is
"no such file or folder", never a network error. A reference is resolved once per process by
huggingface_hub (``snapshot_download``; with ``HF_HUB_OFFLINE=1`` from the local cache only,
``models--ORG--NAME/{refs,snapshots,blobs}``): every later use in the same run gets the same
snapshot folder, whose name is the commit sha recorded in the results (``resolved``), so the
weights a release gate passed can be named exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..text import printable

SEPARATOR = "@"
# Suffixes of files lora-audit reads: a name ending so is a path, never a hub repository.
FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".jsonl")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_BAD_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")  # what git refuses in a ref name


@dataclass(frozen=True)
class HubRef:
    """A hub repository and the revision asked for (None: its default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"{SEPARATOR}{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Snapshot:
    """Where a hub reference resolved to: the local snapshot folder and its commit."""

    ref: HubRef
    path: Path
    commit: str | None  # the 40-hex commit sha (the snapshot folder's name)

    def record(self) -> dict:
        """What the results record about it (provenance ``settings["hub"]``)."""
        return {"repo_id": self.ref.repo_id, "revision": self.ref.revision or "main", "commit": self.commit}


def has_path_syntax(text: str) -> bool:
    """True when ``text`` is written like a local path rather than a hub id ``ORG/NAME``."""
    if text.startswith((".", "/", "~")) or text.endswith("/") or "\\" in text or text.count("/") != 1:
        return True
    if text.lower().endswith(FILE_SUFFIXES):
        return True
    return Path(text.split("/", 1)[0]).is_dir()  # "models/x" next to an existing models/: a local typo


def parse_ref(text: str | os.PathLike) -> HubRef | None:
    """The hub reference ``text`` names (``ORG/NAME`` or ``ORG/NAME@REV``), or None when it is written
    like a path or is no valid repository id. InputError for a valid id with a malformed revision."""
    s = str(text)
    repo, sep, rev = s.partition(SEPARATOR)
    if has_path_syntax(repo):
        return None
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        validate_repo_id(repo)
    except (ImportError, HFValidationError):
        return None
    if sep:
        check_revision(rev, s)
    return HubRef(repo, rev or None)


def check_revision(rev: str, where: str) -> None:
    """InputError unless ``rev`` can name a branch, tag or commit."""
    if not rev or _BAD_REVISION.search(rev) or rev.startswith(("/", "-")) or rev.endswith((".", "/", ".lock")):
        raise InputError(f"{printable(where)}: {printable(repr(rev))} is not a revision; give a branch, tag or "
                         "commit sha after '@' (e.g. ORG/NAME@main or ORG/NAME@<40-hex sha>)")


def is_hub_ref(text: str | os.PathLike) -> bool:
    try:
        return parse_ref(text) is not None
    except InputError:
        return True  # a hub id with a bad revision: resolving it reports the revision


def with_revision(ref: str, revision: str | None) -> str:
    """``ref`` pinned to ``revision`` when it is a hub id without a revision of its own."""
    if not revision:
        return ref
    parsed = None if Path(ref).expanduser().exists() else parse_ref(ref)
    if parsed is None or parsed.revision:
        return ref
    check_revision(revision, "--revision")
    return str(HubRef(parsed.repo_id, revision))


def apply_revision(refs: Iterable[str], revision: str | None) -> list[str]:
    """``--revision REV``: every hub id among ``refs`` given without ``@REV`` pinned to REV;
    InputError when none of them is a hub id (the option would be silently ignored)."""
    refs = [str(r) for r in refs]
    if not revision:
        return refs
    out = [with_revision(r, revision) for r in refs]
    if out == refs and not any(parse_ref(r) for r in refs if not Path(r).expanduser().exists()):
        raise InputError(f"--revision {printable(revision)}: none of the models given is a Hugging Face hub id "
                         "(ORG/NAME); it pins hub ids only")
    return out


_RESOLVED: dict[tuple, Snapshot] = {}


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants, is_offline_mode

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(is_offline_mode() or env.upper() in constants.ENV_VARS_TRUE_VALUES)


def cache_folder() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _repo_folder(repo_id: str) -> Path:
    return cache_folder() / ("models--" + repo_id.replace("/", "--"))


def resolve(text: str, patterns: Iterable[str]) -> Snapshot:
    """The local snapshot of hub reference ``text``, downloaded (files matching ``patterns`` only)
    unless offline; resolved once per process, so every stage of a run reads the same commit.
    InputError naming the fix when it cannot be had."""
    ref = parse_ref(text)
    if ref is None:
        raise InputError(f"{printable(text)}: no such file or folder")
    patterns = tuple(patterns)
    key = (str(ref), patterns, offline(), str(cache_folder()))
    if key in _RESOLVED:
        return _RESOLVED[key]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(patterns),
                                      local_files_only=offline()))
    except RevisionNotFoundError:
        raise InputError(f"{printable(text)}: the hub repository {ref.repo_id} has no revision "
                         f"{printable(repr(ref.revision))} (a branch, tag or commit sha)") from None
    except GatedRepoError:
        raise InputError(f"{printable(text)}: {ref.repo_id} is gated on the Hugging Face hub: accept its terms on "
                         "its page, then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise InputError(f"{printable(text)}: no such file or folder, and no repository {ref.repo_id} on the Hugging "
                         "Face hub (if it is private, log in with `hf auth login`)") from None
    except IncompleteSnapshotError as e:
        raise InputError(f"{printable(text)}: the local Hugging Face cache holds an incomplete snapshot of it "
                         f"({_first_line(e)}); complete it with `{download_command(ref)}`") from None
    except LocalEntryNotFoundError:
        raise InputError(_not_cached(text, ref)) from None
    except Exception as e:  # noqa: BLE001 - network, auth, disk: all user-facing
        raise InputError(f"{printable(text)}: not a local path, and it could not be fetched from the Hugging Face "
                         f"hub ({type(e).__name__}: {_first_line(e)}); download it with `{download_command(ref)}` "
                         "where there is network, or pass the local folder") from None
    snap = Snapshot(ref, path, path.name if _COMMIT.match(path.name) else None)
    _RESOLVED[key] = snap
    return snap


def download_command(ref: HubRef) -> str:
    return f"hf download {ref.repo_id}" + (f" --revision {ref.revision}" if ref.revision else "")


def _not_cached(text: str, ref: HubRef) -> str:
    """Why a hub reference has no usable local snapshot (offline, or the hub unreachable)."""
    repo = _repo_folder(ref.repo_id)
    why = "HF_HUB_OFFLINE=1 forbids downloading" if offline() else "the hub could not be reached"
    have = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    if not have:
        return (f"{printable(text)}: no such file or folder; as a Hugging Face hub id it is not in the local cache "
                f"({cache_folder()}) and {why}. Download it with `{download_command(ref)}`, or pass the local folder")
    refs = sorted(p.name for p in (repo / "refs").iterdir()) if (repo / "refs").is_dir() else []
    held = ", ".join([f"refs {', '.join(refs)}"] * bool(refs) + [f"commits {', '.join(c[:12] for c in have)}"])
    return (f"{printable(text)}: revision {printable(ref.revision or 'main')} of {ref.repo_id} is not in the local "
            f"Hugging Face cache ({repo}; it holds {held}) and {why}. Download it with "
            f"`{download_command(ref)}`")


def cached_snapshot(text: str, patterns: Iterable[str] = ("*",)) -> Path | None:
    """The local snapshot of a hub reference if the cache holds it (never downloads); else None."""
    try:
        ref = parse_ref(text)
    except InputError:
        return None
    if ref is None:
        return None
    for key, snap in _RESOLVED.items():
        if key[0] == str(ref):
            return snap.path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(patterns),
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, in whatever way
        return None


def resolved(refs: Iterable[str | os.PathLike | None]) -> dict[str, dict]:
    """{reference: {"repo_id", "revision", "commit"}} of those ``refs`` this process resolved on the
    hub (local paths are absent): the record of which weights were audited."""
    out = {}
    for r in refs:
        if r is None:
            continue
        snap = next((s for k, s in _RESOLVED.items() if k[0] == str(r) or (k[0] == _canonical(r))), None)
        if snap is not None:
            out[str(r)] = snap.record()
    return out


def hub_settings(refs: Iterable[str | os.PathLike | None]) -> dict:
    """``{"hub": resolved(refs)}`` for a result's settings, or {} when no hub reference was used."""
    pinned = resolved(refs)
    return {"hub": pinned} if pinned else {}


def _canonical(r) -> str | None:
    try:
        ref = parse_ref(r)
    except InputError:
        return None
    return None if ref is None else str(ref)


def named_ref(config: dict) -> str | None:
    """The base an adapter config names: ``base_model_name_or_path``, pinned to the config's
    ``revision`` when it is a hub id without one of its own (PEFT records the revision the adapter
    was trained on); None when it names none."""
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return None
    rev = config.get("revision")
    if isinstance(rev, str) and rev and not Path(name).expanduser().exists():
        try:
            ref = parse_ref(name)
        except InputError:
            return name
        if ref is not None and ref.revision is None:
            return str(HubRef(ref.repo_id, rev))
    return name


def named_base(adapter_folder: str | os.PathLike, config: dict, source: str) -> str:
    """The base an adapter's adapter_config.json names (``named_ref``) as a reference load_model and
    open_stream take: a local path (as given, or next to the adapter folder) or a hub reference.
    InputError when it names none, or nothing that could be found."""
    name = named_ref(config)
    if name is None:
        raise InputError(f"{printable(source)}: adapter_config.json names no base model "
                         "(base_model_name_or_path); pass BASE")
    if Path(name).expanduser().exists() or parse_ref(name) is not None:
        return name
    beside = Path(adapter_folder).parent / name
    if not Path(name).is_absolute() and beside.exists():
        return str(beside)
    raise InputError(f"{printable(source)}: adapter_config.json names base {printable(repr(name))}, which is neither "
                     "a local path nor a Hugging Face hub id; pass BASE")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def model_references(base: str | None, tuned: list[str], revision: str | None = None) -> tuple[str, list[str], bool]:
    """(BASE, TUNED, whether BASE came from the adapters) as a command takes them: every hub id
    without ``@REV`` pinned to ``revision``; BASE omitted (None, or the first argument is itself a
    PEFT adapter) when every TUNED is a PEFT adapter whose adapter_config.json names the same base,
    which is then used (a hub id: resolved and pinned like any other). InputError otherwise."""
    given = [str(r) for r in [base, *tuned] if r is not None]
    refs = [with_revision(r, revision) for r in given]
    if base is not None:
        base, tuned = refs[0], refs[1:]
        if not _is_adapter(base):  # BASE and TUNED as given (no TUNED: the command says what it needs)
            apply_revision(given, revision)  # InputError when --revision pinned nothing
            return base, tuned, False
        tuned = [base, *tuned]
    else:
        tuned = refs
    if not tuned:
        raise InputError("no model given: pass BASE and TUNED")
    from .adapters import read_adapter_config
    from .sources import local_path

    named: dict[str, list[str]] = {}
    for t in tuned:
        path, kind = local_path(t)
        from .detect import Kind

        if kind != Kind.PEFT_ADAPTER:
            raise InputError(f"{printable(t)}: BASE can be left out only when every TUNED is a PEFT adapter whose "
                             "adapter_config.json names its base; this one is a " + kind.value.replace("_", " ")
                             + ("" if len(tuned) > 1 else "; pass BASE and TUNED"))
        named.setdefault(with_revision(named_base(path, read_adapter_config(path), t), revision), []).append(t)
    if len(named) > 1:
        listing = "; ".join(f"{', '.join(map(printable, ts))} name {printable(b)}" for b, ts in named.items())
        raise InputError(f"the adapters name different bases ({listing}); pass BASE")
    base = next(iter(named))
    if revision and refs == given and not base.endswith(SEPARATOR + revision):
        apply_revision(given, revision)  # InputError: --revision pinned nothing
    return base, tuned, True


def _is_adapter(ref: str) -> bool:
    from .detect import Kind
    from .sources import local_path

    try:
        return local_path(ref)[1] == Kind.PEFT_ADAPTER
    except InputError:
        return False  # the loaders report what is wrong with it, in context
