"""The base profile: what safety-scan needs from BASE, from one forward pass over the harmful and
harmless prompts, computed once and cached on disk like the base spectra.

A profile holds, per prompt, the last-token output of every block (``direction.collect``) and the
first-token refusal log-odds, the mean last-token input of every residual writer on each set, the
residual stream's layout (``direction.Residual``), the split of each set into a direction half and
a validation half (``prompts.split_halves``) and the causal test of every candidate direction on
the validation halves (``causal.validate_directions``, a ``results.scan.CausalTest``). The refusal
directions and their quality are derived from the direction halves on load
(``BaseProfile.direction``): cheap, and never stale.

The cache: one authenticated entry of ``lora_audit.cache`` per profile (safetensors, never
pickle, written atomically, keyed BLAKE3 MAC over its fields and tensors) under
``<lora-audit cache>/scan-profiles/``::

    key    = BLAKE3(FORMAT/VERSION, fingerprint of BASE, the harmful and harmless prompt texts and
                    their halves, the chat template file's text (or "tokenizer"), the refusal-start
                    words, the causal test's thresholds)
    fields = {meta: the residual layout, the prompt sets, their halves and the causal test, as JSON}

The fingerprint of BASE (``results.fingerprint``) hashes the contents of its files up to
``CONTENT_LIMIT`` bytes (SmolLM2-135M: 0.5 GB, about 0.4 s), and their names, sizes and
modification times above that. The secret is the caches' key file (``lora_audit.cache.load_secret``):
an entry written by anyone without it, truncated, edited, renamed or of an older format fails
verification, is reported with a ``CacheWarning``, deleted and recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor

from ..cache import CacheWarning, EntryStore, content_key  # noqa: F401  (CacheWarning: the warning a bad entry gives)
from ..errors import InputError
from ..results.scan import CausalTest
from ..results.schema import parse
from .causal import validate_directions
from .direction import Collected, Direction, Residual, collect, find_blocks, refusal_direction, trace_residual

FORMAT = "lora-audit-refusal-profile"
VERSION = "4"  # 1: HMAC-SHA256 and a SHA-256 key; 2: lora_audit.cache (keyed BLAKE3); 3: halves and causal test;
# 4: the causal test's KL on the harmless prompts BASE answers, and its selectivity
CONTENT_LIMIT = 2 * 2**30  # bytes of BASE hashed by content for the key; larger: names, sizes, times
MAX_ENTRY_BYTES = 2 * 2**30
_SETS = ("harmful", "harmless")


@dataclass
class PromptInfo:
    source: str
    layout: str
    n: int
    sha256: str  # over the prompt texts, in order


def prompt_hash(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\0")
    return "sha256:" + h.hexdigest()[:16]


@dataclass
class BaseProfile:
    residual: Residual
    harmful: Collected
    harmless: Collected
    prompts: dict[str, PromptInfo]
    key: str
    halves: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # set -> (direction, validation)
    causal: CausalTest | None = None
    cached: bool = False  # read from the cache
    seconds: float = 0.0  # forward time when computed (activations and the causal test)
    notes: list[str] = field(default_factory=list)

    @functools.cached_property
    def direction(self) -> Direction:
        """Every layer's direction from the direction halves of the two sets."""
        h, b = self.halves["harmful"][0], self.halves["harmless"][0]
        return refusal_direction(self.harmful.states[h], self.harmless.states[b])

    @property
    def refusal_unit(self) -> Tensor | None:
        """The unit direction the causal test chose (float64, (d,)), or None when none is causal."""
        if self.causal is None or self.causal.layer is None:
            return None
        return self.direction.unit[self.causal.layer]

    def writer_input_shift(self, module: str) -> Tensor:
        """mean harmful - mean harmless last-token input of a writer (float64, (in,))."""
        return self.harmful.input_means[module] - self.harmless.input_means[module]


def base_fingerprint(path: str) -> str:
    """BASE's identity for the profile's key and for matching a risk file's panel: a content hash
    (``results.fingerprint``) for models up to ``CONTENT_LIMIT`` bytes."""
    from ..results import fingerprint

    return fingerprint(path, content_limit=CONTENT_LIMIT)


def profile_key(base_fingerprint: str, harmful: list[str], harmless: list[str], template: str | None,
                start_words: list[str], halves: dict[str, tuple[list[int], list[int]]] | None = None) -> str:
    """The cache key of a profile (module docstring): what determines its content."""
    from . import causal as C

    ident = [base_fingerprint, prompt_hash(harmful), prompt_hash(harmless),
             template if template is not None else "tokenizer", list(start_words),
             {k: [list(d), list(v)] for k, (d, v) in sorted((halves or {}).items())},
             [C.ABLATION_MIN_DROP, C.ACTADD_MIN_RISE, C.KL_MAX, C.KL_SELECTIVITY, C.KL_CEILING, C.PRUNE_LAST, C.MAX_CANDIDATES]]
    return content_key(f"{FORMAT}/{VERSION}", json.dumps(ident))


def compute_profile(model, tokenizer, texts: dict[str, list[str]], start_ids: Tensor, *, batch_size: int,
                    prompts: dict[str, PromptInfo], key: str,
                    halves: dict[str, tuple[list[int], list[int]]], min_refusal: float = 0.0) -> BaseProfile:
    """Trace the residual stream, collect both prompt sets' activations on the loaded BASE, and test
    every candidate direction (from the direction halves) on the validation halves; not when BASE
    refuses at most ``min_refusal`` of the harmful prompts (it has no refusal to test)."""
    import time

    t0 = time.perf_counter()
    first = tokenizer(texts["harmful"][0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    residual = trace_residual(model, first)
    _, blocks = find_blocks(model)
    modules = dict(model.named_modules())
    inputs_of = {w.module: modules[w.module] for w in residual.writers}
    got = {s: collect(model, tokenizer, texts[s], blocks, start_ids, batch_size=batch_size, inputs_of=inputs_of,
                      desc=f"base: {s}") for s in _SETS}
    profile = BaseProfile(residual=residual, harmful=got["harmful"], harmless=got["harmless"], prompts=prompts,
                          key=key, halves=halves)
    if float((profile.harmful.scores > 0).double().mean()) <= min_refusal:
        profile.seconds = time.perf_counter() - t0
        return profile
    val = {s: [texts[s][i] for i in halves[s][1]] for s in _SETS}
    profile.causal = validate_directions(model, tokenizer, val["harmful"], val["harmless"], residual, blocks,
                                         profile.direction.r, start_ids, batch_size=batch_size)
    profile.seconds = time.perf_counter() - t0
    return profile


# ---- the cache ------------------------------------------------------------------------------
def cache_dir(root: str | os.PathLike | None = None) -> Path:
    from ..checkpoints.default_model import cache_root

    return Path(root).expanduser() if root else cache_root() / "scan-profiles"


def _tensors(p: BaseProfile) -> dict[str, Tensor]:
    out = {}
    for s in _SETS:
        c: Collected = getattr(p, s)
        out[f"{s}.states"], out[f"{s}.scores"] = c.states.float().contiguous(), c.scores.double().contiguous()
        out.update({f"{s}.in.{k}": v.double().contiguous() for k, v in c.input_means.items()})
    return out


def _store(root: Path, secret: bytes) -> EntryStore:
    return EntryStore(root, FORMAT, VERSION, secret=secret, what="base profile cache entry", max_bytes=MAX_ENTRY_BYTES)


def store(profile: BaseProfile, root: Path, secret: bytes) -> Path:
    """Write ``profile`` under its key (atomically)."""
    meta = json.dumps({"residual": profile.residual.to_meta(),
                       "prompts": {s: vars(i) for s, i in profile.prompts.items()},
                       "halves": {s: [list(d), list(v)] for s, (d, v) in profile.halves.items()},
                       "causal": asdict(profile.causal) if profile.causal is not None else None})
    return _store(root, secret).write(profile.key, _tensors(profile), {"meta": meta})


def _profile(key: str, fields: dict[str, str], tensors: dict[str, Tensor]) -> BaseProfile:
    """The profile an entry's fields and tensors describe; ValueError (or KeyError, TypeError) when
    they do not fit each other."""
    info = json.loads(fields["meta"])
    residual = Residual.from_meta(info["residual"])
    sets = {}
    for s in _SETS:
        prefix = f"{s}.in."
        sets[s] = Collected(states=tensors[f"{s}.states"], scores=tensors[f"{s}.scores"],
                            input_means={k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    prompts = {s: PromptInfo(**v) for s, v in info["prompts"].items()}
    halves = {s: ([int(i) for i in d], [int(i) for i in v]) for s, (d, v) in info["halves"].items()}
    causal = parse(CausalTest, info["causal"], "profile", what="profile") if info.get("causal") is not None else None
    for s, c in sets.items():
        want = (prompts[s].n, residual.n_layers, residual.d_model)
        if tuple(c.states.shape) != want or tuple(c.scores.shape) != want[:1] or \
                set(c.input_means) != {w.module for w in residual.writers}:
            raise ValueError(f"its {s} tensors do not match its metadata")
        if set(halves) != set(_SETS) or sorted(halves[s][0] + halves[s][1]) != list(range(want[0])):
            raise ValueError(f"its {s} halves do not match its prompts")
    return BaseProfile(residual=residual, harmful=sets["harmful"], harmless=sets["harmless"], prompts=prompts,
                       key=key, halves=halves, causal=causal, cached=True)


def lookup(root: Path, key: str, secret: bytes) -> BaseProfile | None:
    """The cached profile of ``key``, or None; a bad entry is warned about (``CacheWarning``) and
    deleted."""
    made: list[BaseProfile] = []

    def check(fields: dict[str, str], tensors: dict[str, Tensor]) -> None:
        try:
            made.append(_profile(key, fields, tensors))
        except (KeyError, TypeError, AttributeError, RecursionError, json.JSONDecodeError, InputError) as e:
            raise ValueError(f"its metadata does not describe a profile ({type(e).__name__}: {e})") from None

    entry = _store(root, secret).get(key, check)
    return made[0] if entry is not None else None
