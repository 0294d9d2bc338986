"""Intruder-dimension mitigation of a LoRA adapter (Shuttleworth et al., "LoRA vs Full
Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228, Sec. 6 / Fig. 8), the operation of
peft 0.21's ``peft.tuners.lora.intruders.reduce_intruder_dimension``, on the checkpoint stream:
no model is loaded (a GGUF base works as well as a folder), and each matrix costs one SVD of W1
(plus the base's, as in the audit) where peft takes three.

For every LoRA module, W0 its base matrix and dW = s·B·A its update (s resolved by the loader:
alpha / r, alpha / sqrt(r) for rsLoRA, rank and alpha patterns):

    W1 = W0 + dW = U1 diag(S1) V1^T                      one thin SVD of the tuned matrix
    I  = { j < k_used : max_i |<u1_j, u0_i>| < epsilon }  the audit's test (``exact.topk_from_svd``,
                                                          null directions never examined)
    dW' = dW + (lambda - 1) sum_{j in I} s1_j u1_j v1_j^T  (= W1 scaled along I, minus W0)
    s·B'·A' = the best rank-r approximation of dW' (Eckart-Young), computed from the factored
          form dW' = [s·B, (lambda - 1) U1_I diag(S1_I)] [A; V1_I^T] of rank <= r + |I| by a QR
          of each factor and the SVD of the small core (never an m x n SVD):
          B' = sign(s) U_r diag(sqrt(S_r / |s|)),  A' = diag(sqrt(S_r / |s|)) V_r^T
          (the norm shared between B and A, as peft does, so that training can resume)

lambda = 1, or a matrix without intruders, keeps the module's factors as they are. The
truncation is an approximation when |I| > 0; ``truncation_rel_error`` = ||dW' - s B'A'||_F /
||dW'||_F, exact from the core's singular values. Intruders after mitigation are counted on
W0 + s·B'·A' with the audit's own top-k (``engine.tuned_topk``).

The new adapter keeps the original adapter_config.json (same r, alpha, rsLoRA, patterns) and the
original tensor keys, shapes and dtypes; tensors other than the mitigated lora_A / lora_B
(biases, modules_to_save, factors of unchanged modules) are copied.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import FormatError, InputError
from .exact import base_spectrum, examined, topk_from_svd
from .types import BaseSpectrum

_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_(?:embedding_)?[AB])"
                         r"(?P<rest>(?:\.[^.]+){0,2})$")


def check_settings(lam: float, k: int, epsilon: float) -> None:
    """InputError naming the bad value (the command's click ranges say the same)."""
    if not 0.0 <= float(lam) <= 1.0:
        raise InputError(f"--lambda must lie in [0, 1] (the fraction of each intruder direction kept), got {lam!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"--k must be an integer >= 1, got {k!r}")
    if not 0.0 < float(epsilon) < 1.0:
        raise InputError(f"--epsilon must lie strictly between 0 and 1 (a cosine threshold), got {epsilon!r}")


# ---- one matrix ----------------------------------------------------------------------------------
def rank_r_factors(L: Tensor, R: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, float]:
    """(B', A', relative error) with scale·B'·A' the best rank-r approximation of L @ R.

    L: (m, q), R: (q, n), any q. L = Ql Rl, R^T = Qr Rr (reduced QR), so L R = Ql (Rl Rr^T) Qr^T
    with orthonormal Ql, Qr: the SVD of the small core gives that of L R. Computed in float64;
    B' (m, r), A' (r, n), zero-padded when L R has rank < r."""
    Ql, Rl = torch.linalg.qr(L.double(), mode="reduced")  # (m, q'), (q', q)
    Qr, Rr = torch.linalg.qr(R.double().T, mode="reduced")  # (n, q''), (q'', q)
    Uc, Sc, Vch = torch.linalg.svd(Rl @ Rr.T, full_matrices=False)  # core (q', q'')
    total = float(Sc.square().sum())
    err = math.sqrt(float(Sc[r:].square().sum()) / total) if total > 0 else 0.0
    root = (Sc[:r] / abs(scale)).sqrt()  # (r',)
    B = math.copysign(1.0, scale) * (Ql @ Uc[:, :r]) * root  # (m, r')
    A = root[:, None] * (Vch[:r] @ Qr.T)  # (r', n)
    if B.shape[1] < r:
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0)
    return B, A, err


def mitigate_matrix(W0: Tensor, B: Tensor, A: Tensor, scale: float, *, lam: float, k: int, epsilon: float,
                    store_dtype: torch.dtype | None = None, base: BaseSpectrum | None = None
                    ) -> tuple[Tensor | None, Tensor | None, dict[str, Any]]:
    """Mitigate one LoRA update s·B·A (B (m, r), A (r, n)) on W0 (m, n); all in one float32 or
    float64 dtype and on one device. ``store_dtype``: the adapter's own dtype, to which the new
    factors are rounded (before the intruders after mitigation are counted). ``base``: W0's SVD
    when known (the spectrum cache), else computed here.

    Returns (B', A', record), B' and A' None when the factors stay as they are (no intruder, or
    lambda = 1). The record: intruders_before, intruders_after, k_used, rewritten,
    truncation_rel_error."""
    from ..checkpoints.deltas import LowRank
    from .engine import tuned_topk

    base = base if base is not None else base_spectrum(W0)
    W1 = LowRank(B, A, scale).merged(W0)  # (m, n)
    U1, S1, V1h = torch.linalg.svd(W1, full_matrices=False)  # (m, p), (p,), (p, n)
    top = examined(topk_from_svd(base, U1, S1, k), tuple(W0.shape), W0.dtype)  # type: ignore[arg-type]
    intr = (top.max_cos < epsilon).nonzero().flatten()  # indices into W1's spectrum
    rec: dict[str, Any] = {"intruders_before": int(intr.numel()), "intruders_after": int(intr.numel()),
                           "k_used": int(top.singular_values.numel()), "rewritten": False, "truncation_rel_error": 0.0}
    if intr.numel() == 0 or lam == 1.0:
        return None, None, rec
    L = torch.cat([scale * B.double(), (lam - 1.0) * U1[:, intr].double() * S1[intr].double()], dim=1)  # (m, r+|I|)
    R = torch.cat([A.double(), V1h[intr].double()], dim=0)  # (r+|I|, n)
    B2, A2, rec["truncation_rel_error"] = rank_r_factors(L, R, B.shape[1], scale)
    B2, A2 = B2.to(store_dtype or B.dtype), A2.to(store_dtype or A.dtype)
    after, _ = tuned_topk(base, W0, LowRank(B2.to(B.dtype), A2.to(A.dtype), scale), k, exact=False)
    rec["intruders_after"], rec["rewritten"] = int((after.max_cos < epsilon).sum()), True
    return B2, A2, rec


# ---- the adapter ---------------------------------------------------------------------------------
_NOT_AN_ADAPTER = {"hf_folder": "a full model folder", "safetensors_file": "a safetensors weight file",
                   "kohya_lora": "a kohya LoRA file", "gguf": "a GGUF model", "hub_id": "a hub id (not downloaded)",
                   "pickle": "pickle weights"}


def _adapter_folder(adapter: str | Path) -> tuple[Path, bytes]:
    """(folder, adapter_config.json bytes) of a local PEFT LoRA adapter; InputError for anything else."""
    from ..checkpoints import Kind, detect
    from ..io import read_user_bytes

    kind = detect(adapter)
    if kind != Kind.PEFT_ADAPTER:
        raise InputError(f"{adapter}: is {_NOT_AN_ADAPTER.get(kind.value, kind.value)}, not a PEFT LoRA adapter; "
                         "mitigate rewrites an adapter folder (adapter_config.json + adapter_model.safetensors). "
                         "To measure a full model's intruders use lora-audit spectrum")
    folder = Path(adapter)
    config_file = folder / "adapter_config.json"
    raw = read_user_bytes(config_file, "adapter config")
    cfg = _parse_config(raw, config_file)
    if cfg.get("use_dora"):
        raise InputError(f"{config_file}: a DoRA adapter (use_dora: true); mitigate handles plain LoRA adapters "
                         "(incl. rsLoRA and rank/alpha patterns): DoRA's magnitude vector rescales every row of W1, "
                         "which a rank-r refactoring of the update does not keep")
    return folder, raw


def _parse_config(raw: bytes, path: Path) -> dict:
    """adapter_config.json's bytes as a JSON object (FormatError naming ``path`` otherwise)."""
    from ..io import json_kind, parse_json

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: the adapter config is not UTF-8 ({e.reason}); save it as UTF-8") from None
    cfg = parse_json(text, path)
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: the adapter config must be a JSON object, got {json_kind(cfg)}")
    return cfg


def _factor_keys(keys) -> dict[str, dict[str, Any]]:
    """module -> {"A": key, "B": key, "embedding": bool} for the LoRA factors in an adapter file."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        m = _FACTOR_KEY.match(key)
        if m is None or m["rest"].endswith(".bias"):
            continue
        entry = out.setdefault(m["module"], {"embedding": False})
        entry[m["part"][-1]] = key
        entry["embedding"] = entry["embedding"] or "embedding" in m["part"]
    return out


def _module_of(name: str, modules: dict[str, dict[str, Any]], adapter) -> dict[str, Any]:
    """The factor keys of the module adapting base parameter ``name`` (module names may carry
    or drop leading parts of the base's names, as the stream allows)."""
    stem = name.removesuffix(".weight")
    hits = [m for m in modules if m == stem or m.endswith("." + stem) or stem.endswith("." + m)]
    if len(hits) != 1 or not {"A", "B"} <= set(modules[hits[0]]):
        raise InputError(f"{adapter}: cannot tell which lora_A / lora_B tensors adapt {name} "
                         f"(candidates: {', '.join(hits) or 'none'})")
    return modules[hits[0]]


def _store(tensors: dict[str, Tensor], keys: dict[str, Any], B: Tensor, A: Tensor) -> None:
    """Put B' (m, r) and A' (r, n) back under the module's keys, in the stored shapes and dtypes
    (mutates ``tensors``). Embedding LoRA stores (B A)^T as lora_embedding_A (r, vocab) and
    lora_embedding_B (dim, r), so the stream's B = A_emb^T and A = B_emb^T."""
    new = {"A": B.T, "B": A.T} if keys["embedding"] else {"A": A, "B": B}
    for part, t in new.items():
        old = tensors[keys[part]]
        tensors[keys[part]] = t.reshape(old.shape).to(old.dtype).contiguous()


def _mitigate_stream(stream, tensors: dict[str, Tensor], adapter, device: torch.device, cache, *, lam: float,
                     k: int, epsilon: float, show_progress: bool) -> tuple[dict[str, dict], list[str]]:
    """Mitigate every LoRA module of the (single-adapter) stream, writing new factors into
    ``tensors`` (mutated); base spectra from ``cache`` when given. Returns ({base name: record}, notes)."""
    from ..checkpoints.deltas import Dense, LowRank
    from ..progress import progress
    from .findings import screen_base, screen_delta

    modules = _factor_keys(tensors)
    records: dict[str, dict] = {}
    notes: list[str] = []
    groups = progress(stream, total=len(stream), desc="mitigate", unit="matrix") if show_progress else stream
    for group in groups:
        name, delta = group.name, group.deltas[0]
        if isinstance(delta, Dense):  # modules_to_save: a full replacement, not a LoRA update
            notes.append(f"{name}: a full replacement tensor (modules_to_save), copied unchanged")
            continue
        if not isinstance(delta, LowRank):
            raise InputError(f"{adapter}: {name} is a {type(delta).__name__} update; mitigate handles plain LoRA")
        W0, delta = group.base.to(device), delta.to(device=device)
        found = screen_base(name, W0)
        changed, found = (True, found) if found is not None else screen_delta(name, W0, delta)
        if not changed:
            continue
        if found is not None:
            raise InputError(f"{adapter}: cannot mitigate {name}: {found.reason} (in the {found.where}); "
                             "`lora-audit spectrum` lists every such matrix")
        keys = _module_of(name, modules, adapter)
        base = cache.base_spectrum(W0, device) if cache is not None else None
        B2, A2, records[name] = mitigate_matrix(W0, delta.B, delta.A, delta.scale, lam=lam, k=k, epsilon=epsilon,
                                                store_dtype=tensors[keys["A"]].dtype, base=base)
        if B2 is not None:
            _store(tensors, keys, B2.cpu(), A2.cpu())  # type: ignore[union-attr]
    return records, notes


def mitigate_adapter(base: str | Path, adapter: str | Path, out: str | Path, *, lam: float = 0.75, k: int = 10,
                     epsilon: float = 0.5, device: str | torch.device = "cpu", overwrite: bool = False,
                     json_path: str | Path | None = None, progress: bool = True,
                     dtype: torch.dtype = torch.float32, cache=None):
    """Scale the intruder dimensions of the LoRA ``adapter`` on ``base`` by ``lam`` and write the
    result as a new PEFT adapter to the folder ``out`` (see the module docstring), with
    ``out/mitigate.json``, and the same record to ``json_path`` when given. Returns the record
    (``results.mitigate.MitigateResult``).
    ``cache``: a base-spectrum cache (``api.open_cache()``, the one ``lora-audit spectrum``
    fills), so that a base audited before costs no SVD here; None decomposes every W0.

    Raises InputError / OutputError before any work for bad settings (lambda in [0, 1], k >= 1,
    epsilon in (0, 1)), an ADAPTER that is not a PEFT LoRA adapter (a full model, DoRA, kohya),
    inputs that do not fit, or outputs that would replace what lora-audit did not write; and when
    a matrix holds NaN/Inf values (nothing is written then)."""
    from safetensors import safe_open

    from ..checkpoints import open_stream
    from ..device import resolve_device
    from ..io import check_output_dir, check_output_file, check_outputs

    check_settings(lam, k, epsilon)
    folder, config_bytes = _adapter_folder(adapter)
    check_outputs([json_path], [base, adapter], folders=[out])
    check_output_dir(out, overwrite=overwrite, what="mitigated adapter")
    if json_path is not None:
        check_output_file(json_path, "mitigate record")
    dev = resolve_device(device)
    stream = open_stream(base, [str(adapter)], include_embeddings=True, dtype=dtype)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        metadata = fh.metadata() or {"format": "pt"}
    try:
        modules, notes = _mitigate_stream(stream, tensors, adapter, dev, cache, lam=lam, k=k, epsilon=epsilon,
                                          show_progress=progress)
    finally:
        if cache is not None:
            cache.flush()  # new entries are written in the background
    record = _record(base, adapter, out, modules, notes, lam=lam, k=k, epsilon=epsilon, dtype=dtype, device=dev)
    _write(out, overwrite, config_bytes, tensors, metadata, record, json_path)
    return record


def _record(base, adapter, out, modules: dict[str, dict], notes: list[str], **settings):
    from ..results.mitigate import MitigatedMatrix, MitigateResult

    settings["dtype"] = str(settings["dtype"]).replace("torch.", "")
    settings["device"] = str(settings["device"])
    return MitigateResult(base=str(base), adapter=str(adapter), out=str(out), lam=settings["lam"], k=settings["k"],
                          epsilon=settings["epsilon"],
                          intruders_before=sum(r["intruders_before"] for r in modules.values()),
                          intruders_after=sum(r["intruders_after"] for r in modules.values()),
                          matrices_rewritten=sum(1 for r in modules.values() if r["rewritten"]), notes=notes,
                          modules={k: MitigatedMatrix(**r) for k, r in modules.items()}, settings=settings)


def _write(out, overwrite: bool, config_bytes: bytes, tensors: dict[str, Tensor], metadata: dict[str, str],
           record, json_path) -> None:
    from safetensors.torch import save_file

    from ..io import atomic_dir

    with atomic_dir(out, overwrite=overwrite, what="mitigate") as tmp:
        (tmp / "adapter_config.json").write_bytes(config_bytes)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=metadata)
        record.write_json(tmp / "mitigate.json")
    if json_path is not None:
        record.write_json(json_path)
