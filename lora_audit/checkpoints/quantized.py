"""Quantised bases: weights dequantised for the audit, and the quantisation error each matrix may
carry, so that an update is never mistaken for quantisation noise.

Layouts read (config.json ``quantization_config.quant_method`` names the method; the tensors are
checked against it):

bitsandbytes, as transformers saves a model loaded with ``BitsAndBytesConfig`` (QLoRA, Dettmers
et al. 2023; LLM.int8, Dettmers et al. 2022)::

    4-bit  <w>.weight                  uint8 (n/2, 1): two 4-bit codes per byte
           <w>.weight.absmax           one scale per block of ``blocksize`` values (uint8 with
                                       double quantisation, float32 without)
           <w>.weight.quant_map        float32 (16,): the code book (NF4 or FP4)
           <w>.weight.nested_absmax, <w>.weight.nested_quant_map   double quantisation of absmax
           <w>.weight.quant_state.bitsandbytes__nf4|fp4   uint8 bytes of a JSON object: quant_type,
                                       blocksize, dtype, shape, nested_blocksize, nested_dtype,
                                       nested_offset
    8-bit  <w>.weight int8 (out, in), <module>.SCB float32 (out,) row absmax, <w>.weight_format 0

Dequantised here by the format's definition, so that reading needs no bitsandbytes: byte i of the
packed weight holds values 2i (high nibble) and 2i+1 (low nibble) of the row-major flattened
matrix, value j is quant_map[code_j] * absmax[j // blocksize]; with double quantisation absmax_b =
nested_quant_map[absmax_u8_b] * nested_absmax[b // nested_blocksize] + nested_offset; int8 is
W = int8 * SCB_row / 127. (bitsandbytes 0.50's CPU ``dequantize_4bit`` is not used: it disagrees
with its own ``quantize_4bit`` when a block spans two rows, e.g. on a 64 x 96 matrix with blocks
of 64, by several code spacings; transformers' ``dequantize()`` inherits that on CPU-only machines.)
Every field is checked first; the JSON is parsed here and no string of the file reaches ``getattr``.

FP8 with block scales (``quant_method`` "fp8", the layout transformers' FineGrainedFP8 saves and
DeepSeek-V3 / Qwen3-FP8 ship)::

    <w>.weight float8_e4m3fn (out, in), <w>.weight_scale_inv float32 (ceil(out/bo), ceil(in/bi))

dequantised here as W = fp8 · scale per (bo x bi) block, ``weight_block_size`` = [bo, bi]
(transformers quantises on GPUs only; this is its dequantisation formula, done in float32).

Error record per matrix (``dequantization`` in the spectrum JSON). The original weights are gone,
but round-to-nearest leaves every original value inside a known cell around its dequantised value:
for blockwise absmax quantisation the cell of code c_k is [(c_{k-1}+c_k)/2, (c_k+c_{k+1})/2] ·
absmax (clipped to ±absmax), for int8 it is ± absmax_row/254, for FP8 e4m3 ± half a unit in the last
place of the 3-bit mantissa. Reported:

    error_max_abs_bound   max over elements of the largest possible |W - W_q|
    error_fro_bound       ||largest possible |W - W_q| elementwise||_F, a bound on ||E||_F >= ||E||_2
    error_fro_expected    sqrt(sum width^2 / 12): ||E||_F if errors are uniform in their cells

The engine compares the update's spectral norm with ``error_fro_bound``: an update no larger than
the possible quantisation error cannot be told apart from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..text import printable

BNB_4BIT_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BNB_QS_PREFIX = "quant_state.bitsandbytes__"
MAX_QUANT_STATE_BYTES = 1 << 16  # bitsandbytes writes ~200 bytes; decoded with .tolist(), so bounded first
_FLOAT_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quant_method(config: dict) -> str | None:
    """The ``quantization_config.quant_method`` of a model config (None when not quantised)."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        m = qc.get("quant_method")
        return str(m) if m is not None else "unknown"
    return None


# ---- error bounds --------------------------------------------------------------------------------
def cell_errors(codes: torch.Tensor, code_book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For normalised values that round-to-nearest put on ``code_book`` entries: (largest possible
    distance to the original, cell width), both in code units. The cells of the smallest and
    largest codes end at -1 and 1 (absmax scaling keeps every value in [-1, 1])."""
    book = torch.sort(code_book.double().unique()).values  # (K,)
    idx = torch.bucketize(codes.double(), book).clamp(0, len(book) - 1)
    left = (idx - 1).clamp(min=0)
    nearer_left = (codes.double() - book[left]).abs() < (codes.double() - book[idx]).abs()
    idx = torch.where(nearer_left, left, idx)  # snap each value to its code
    c = book[idx]
    lo = torch.where(idx > 0, (book[(idx - 1).clamp(min=0)] + c) / 2, torch.minimum(c, torch.tensor(-1.0,
                     dtype=c.dtype)))
    hi = torch.where(idx < len(book) - 1, (book[(idx + 1).clamp(max=len(book) - 1)] + c) / 2,
                     torch.maximum(c, torch.tensor(1.0, dtype=c.dtype)))
    return torch.maximum(c - lo, hi - c), hi - lo


def error_record(method: str, max_dist: torch.Tensor, width: torch.Tensor, **extra) -> dict:
    """The per-matrix record (see the module docstring) from elementwise bounds."""
    md, w = max_dist.double(), width.double()
    return {"method": method, **extra, "error_max_abs_bound": float(md.max()) if md.numel() else 0.0,
            "error_fro_bound": float(md.norm()), "error_fro_expected": float(w.norm() / math.sqrt(12.0))}


# ---- bitsandbytes 4-bit --------------------------------------------------------------------------
@dataclass
class Bnb4bit:
    """The checked quant state of one 4-bit weight."""

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, int]
    nested: dict | None  # nested_blocksize, nested_dtype, nested_offset


def parse_bnb_state(raw: torch.Tensor, where: str) -> Bnb4bit:
    """The JSON packed in ``quant_state.bitsandbytes__*``, checked field by field."""
    from ..io import parse_json

    if raw.numel() > MAX_QUANT_STATE_BYTES:
        raise FormatError(f"{where}: {raw.numel()} bytes; a quant state is a JSON object of a few hundred bytes")
    try:
        text = bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not a JSON object in UTF-8 ({e})") from None
    obj = parse_json(text, where)
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: must hold a JSON object")

    def need(key, ok, accepted):
        v = obj.get(key)
        if not ok(v):
            raise FormatError(f"{where}: field {key!r} is {printable(repr(v))[:60]}; it must be {accepted}")
        return v

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    qt = need("quant_type", lambda v: v in ("nf4", "fp4"), '"nf4" or "fp4"')
    bs = need("blocksize", is_int, "a positive integer")
    dt = need("dtype", lambda v: isinstance(v, str) and v in _FLOAT_NAMES, " or ".join(_FLOAT_NAMES))
    shape = need("shape", lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(x) for x in v),
                 "[rows, cols] (positive integers)")
    nested = None
    if "nested_blocksize" in obj:
        nested = {"blocksize": need("nested_blocksize", is_int, "a positive integer"),
                  "dtype": need("nested_dtype", lambda v: isinstance(v, str) and v in _FLOAT_NAMES, " or ".join(_FLOAT_NAMES)),
                  "offset": float(need("nested_offset", lambda v: isinstance(v, (int, float)) and not
                                       isinstance(v, bool) and math.isfinite(v), "a finite number"))}
    return Bnb4bit(qt, bs, _FLOAT_NAMES[dt], (shape[0], shape[1]), nested)


def _finite(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """``t`` as float64; FormatError naming the stored quantisation tensor when it holds NaN/inf."""
    d = t.double()
    if not bool(torch.isfinite(d).all()):
        raise FormatError(f"{where}: the stored {name} holds NaN or infinite values; a quantisation "
                          "code book or scale must be finite")
    return d


def dequantize_bnb_4bit(packed: torch.Tensor, state: Bnb4bit, aux: dict[str, torch.Tensor],
                        where: str) -> tuple[torch.Tensor, dict]:
    """(W float32 (out, in), error record) of one bitsandbytes 4-bit weight. ``aux`` holds the
    absmax / quant_map (/ nested_*) tensors, keyed by those names."""
    n = state.shape[0] * state.shape[1]
    blocks = -(-n // state.blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 2):
        raise FormatError(f"{where}: packed weight {list(packed.shape)} {packed.dtype} does not hold {n} 4-bit "
                          f"codes of shape {list(state.shape)}")
    if aux.get("absmax") is None or aux["absmax"].numel() != blocks or aux.get("quant_map") is None \
            or aux["quant_map"].numel() != 16:
        raise FormatError(f"{where}: needs absmax with one value per block ({blocks} blocks of {state.blocksize}) "
                          "and a quant_map of 16 codes")
    b = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]  # (n,): high nibble first
    book = _finite(aux["quant_map"], "quant_map", where).reshape(-1)
    absmax, absmax_err = _bnb_absmax(state, aux, blocks, where)
    scale = absmax.repeat_interleave(state.blocksize)[:n]  # (n,)
    err_scale = absmax_err.repeat_interleave(state.blocksize)[:n]
    c = book[codes]  # (n,) values in code units
    W = (c * scale).reshape(state.shape)
    dist, width = cell_errors(c, book)
    # |x - c a_q| <= d (a_q + e_a) + |c| e_a: the cell in code units, scaled by an absmax that may
    # itself be off by e_a (double quantisation)
    max_dist = dist * (scale + err_scale) + c.abs() * err_scale
    rec = error_record(f"bitsandbytes {state.quant_type}", max_dist, width * scale, blocksize=state.blocksize,
                       double_quant=state.nested is not None)
    return W.to(state.dtype).float(), rec


def _bnb_absmax(state: Bnb4bit, aux: dict[str, torch.Tensor], blocks: int, where: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block as used for dequantising, bound on its own error) in float64; the error is
    0 without double quantisation, else the nested blockwise 8-bit cell (Dettmers et al. 2023, Sec. 3)."""
    if state.nested is None:
        a = _finite(aux["absmax"], "absmax", where).reshape(-1)
        return a, torch.zeros_like(a)
    nb = state.nested["blocksize"]
    book, nested = aux.get("nested_quant_map"), aux.get("nested_absmax")
    if aux["absmax"].dtype != torch.uint8 or book is None or book.numel() != 256 or nested is None \
            or nested.numel() != -(-blocks // nb):
        raise FormatError(f"{where}: double quantisation needs uint8 absmax, a nested_quant_map of 256 codes and "
                          f"one nested_absmax per {nb} blocks")
    scale = _finite(nested, "nested_absmax", where).reshape(-1).repeat_interleave(nb)[:blocks]
    c = _finite(book, "nested_quant_map", where).reshape(-1)[aux["absmax"].reshape(-1).to(torch.int64)]
    dist, _ = cell_errors(c, book)
    return c * scale + state.nested["offset"], dist * scale


# ---- bitsandbytes 8-bit (LLM.int8) -----------------------------------------------------------------
# Quantisers compute x * 127 / absmax in half precision (bitsandbytes on the CPU does), which can push
# a value across a rounding boundary by half an fp16 ulp at 127, 1/32 of a step: seen up to 0.521 steps.
INT8_ROUNDING_SLACK = 1 / 32


def dequantize_bnb_int8(weight: torch.Tensor, scb: torch.Tensor, where: str) -> tuple[torch.Tensor, dict]:
    """(W float32, error record) of an LLM.int8 weight: W = int8 * SCB_row / 127, so every value lies
    within half a step, SCB_row / 254, of the original (plus ``INT8_ROUNDING_SLACK`` of a step)."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or scb.numel() != weight.shape[0]:
        raise FormatError(f"{where}: int8 weight {list(weight.shape)} {weight.dtype} with {scb.numel()} row "
                          "scales (SCB); LLM.int8 stores int8 (out, in) and one scale per row")
    step = (_finite(scb, "SCB", where) / 127.0).reshape(-1, 1).expand(weight.shape)  # (out, in)
    return (weight.double() * step).float(), error_record("bitsandbytes int8", step * (0.5 + INT8_ROUNDING_SLACK),
                                                          step)


# ---- FP8 with block scales -------------------------------------------------------------------------
def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          where: str) -> tuple[torch.Tensor, dict]:
    """(W float32, error record) of a block-scaled FP8 weight: W = fp8 · scale_inv[block]. The error
    of e4m3 round-to-nearest is half a unit in the last place: 2^(e - 3) / 2 for normal numbers of
    exponent e, 2^-10 below 2^-6 (subnormals), times the block's scale."""
    if weight.dim() != 2 or weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise FormatError(f"{where}: FP8 weight {list(weight.shape)} {weight.dtype}; expected a 2-D float8 tensor")
    bo, bi = block
    rows, cols = weight.shape
    want = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != want:
        raise FormatError(f"{where}: weight_scale_inv has shape {list(scale_inv.shape)}; blocks of {bo}x{bi} over "
                          f"{rows}x{cols} need {list(want)}")
    scale = _finite(scale_inv, "weight_scale_inv", where).repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]  # (rows, cols)
    v = weight.double()  # exact: every fp8 value is a float64
    mant = 3 if weight.dtype == torch.float8_e4m3fn else 2
    min_normal = 2.0 ** (-6 if weight.dtype == torch.float8_e4m3fn else -14)
    exp = torch.floor(torch.log2(v.abs().clamp(min=min_normal)))
    ulp = torch.pow(2.0, exp - mant)
    return (v * scale).float(), error_record(f"fp8 {str(weight.dtype).replace('torch.', '')} blocks {bo}x{bi}",
                                             ulp / 2 * scale, ulp * scale, blocksize=[bo, bi])
