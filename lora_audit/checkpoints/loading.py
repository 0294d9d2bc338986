"""How whole models are loaded: dtype, placement across devices, bitsandbytes quantisation.

``LoadOptions`` carries the three choices of ``--dtype``, ``--device-map`` and
``--load-in-4bit`` / ``--load-in-8bit``; ``check`` refuses impossible combinations in one line
before any model is read; ``load_dtype`` resolves ``auto`` (the checkpoint's own dtype on CUDA,
float32 elsewhere); ``pretrained_kwargs`` turns them into transformers' ``from_pretrained``
arguments (accelerate places the layers for a device map; ``BitsAndBytesConfig`` quantises).

Only generation, scoring and training see these choices: the spectral numerics read the weight
files themselves and compute in float32 or float64 whatever a model was loaded in.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeviceError, InputError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
QUANTIZATIONS = {"4bit": "bitsandbytes 4-bit nf4 (double quantisation)", "8bit": "bitsandbytes 8-bit (LLM.int8)"}
# transformers' safetensors dtype names -> torch dtypes, for a checkpoint whose config states none
_STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a whole model: ``dtype`` (auto, bfloat16, float16, float32), ``device_map`` (an
    accelerate strategy: the layers placed across every GPU, the rest offloaded to the CPU), and
    ``quantization`` ("4bit" or "8bit", bitsandbytes)."""

    dtype: str = "auto"
    device_map: str | None = None
    quantization: str | None = None

    @property
    def places_itself(self) -> bool:
        """The model's layers are put on devices by accelerate / bitsandbytes, not moved with ``.to``."""
        return self.device_map is not None or self.quantization is not None

    def check(self, device: str | torch.device = "auto") -> None:
        """One-line InputError / DeviceError for options that cannot work here, before any model is read."""
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise InputError(f"quantization {self.quantization!r}: expected 4bit or 8bit")
        spec = str(device).strip().lower()
        if self.device_map is not None:
            if self.device_map not in DEVICE_MAPS:
                raise InputError(f"--device-map {self.device_map!r}: expected one of {', '.join(DEVICE_MAPS)} "
                                 "(accelerate's strategies: layers across every GPU, the rest offloaded to the CPU)")
            if spec not in ("auto", ""):
                raise InputError(f"--device-map {self.device_map} places the layers itself; it cannot be combined "
                                 f"with --device {spec} (leave --device at auto, or drop --device-map)")
            if importlib.util.find_spec("accelerate") is None:
                raise InputError(f"--device-map {self.device_map} needs the 'accelerate' package (pip install accelerate)")
        if self.quantization is not None:
            self._check_bitsandbytes(spec)

    def _check_bitsandbytes(self, spec: str) -> None:
        flag = f"--load-in-{self.quantization}"
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError(f"{flag} needs the 'bitsandbytes' package (pip install bitsandbytes) and, with most "
                             "versions, a CUDA GPU")
        from ..device import resolve_device

        target = "cuda" if self.device_map is not None and torch.cuda.is_available() else resolve_device(spec).type
        supported = bitsandbytes_devices()
        if target not in supported:
            import bitsandbytes

            have = "CUDA" if target == "cuda" else f"no CUDA device ({target} only)"
            raise DeviceError(f"{flag}: bitsandbytes {bitsandbytes.__version__} runs on {', '.join(sorted(supported))}, "
                              f"and this machine has {have}; run on a CUDA GPU or drop {flag}")

    def settings(self) -> dict:
        """The options as the results record them (next to the dtype each model was loaded in)."""
        return {"dtype_option": self.dtype, "device_map": self.device_map,
                "quantization": QUANTIZATIONS.get(self.quantization or "")}


def bitsandbytes_devices() -> set[str]:
    """The torch device types the installed bitsandbytes quantises on (CUDA only before its
    multi-backend releases, which list theirs in ``supported_torch_devices``)."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries) fails in many ways
        return set()
    return set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))


def checkpoint_dtype(folder: Path | None, config: dict) -> torch.dtype | None:
    """The dtype a checkpoint is stored in: its config's ``dtype`` / ``torch_dtype``, else the
    first floating tensor of its (first) safetensors file; None when neither says."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
            return DTYPES[value.replace("torch.", "")]
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(files[0]), framework="pt") as f:
            for k in f.keys():
                stored = _STORED.get(f.get_slice(k).get_dtype())
                if stored is not None:
                    return stored if stored != torch.float64 else torch.float32
    except Exception:  # noqa: BLE001 - the loader reports unreadable files with their own message
        return None
    return None


def load_dtype(dtype: str | torch.dtype, device: torch.device, folder: Path | None = None,
               config: dict | None = None) -> torch.dtype:
    """The dtype to load in: an explicit one as given; ``auto``: the checkpoint's own dtype on
    CUDA (float32 when it states none), float32 on the CPU and other devices (CPU kernels of 16-bit
    types are slow on most processors; ask for bfloat16 to halve the memory)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return checkpoint_dtype(folder, config or {}) or torch.float32


def pretrained_kwargs(opts: LoadOptions, dtype: torch.dtype, device: torch.device) -> dict:
    """transformers ``from_pretrained`` arguments for ``opts``: a device map for accelerate, a
    ``BitsAndBytesConfig`` (compute in ``dtype``) for quantisation; nothing else for a plain load."""
    kw: dict = {}
    if opts.device_map is not None:
        kw["device_map"] = opts.device_map
    if opts.quantization is not None:
        from transformers import BitsAndBytesConfig

        if opts.quantization == "4bit":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
        else:
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kw.setdefault("device_map", {"": str(device)})  # bitsandbytes quantises as the weights reach the device
    return kw


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


def placement(model: torch.nn.Module) -> dict[str, int]:
    """How many parameter tensors lie on each device (what accelerate's device map decided; on one
    device the map names none, so the parameters are counted)."""
    return dict(sorted(Counter(str(p.device) for p in model.parameters()).items()))


def load_record(opts: LoadOptions, loaded) -> dict:
    """What a result records of how its models were loaded: the options, the dtype the given
    ``LoadedModel`` was loaded in and, under a device map or quantisation, where its parameters lie."""
    rec = {"dtype": dtype_name(loaded.dtype), **opts.settings()}
    if opts.places_itself:
        rec["placement"] = placement(loaded.model)
    return rec


def planned_dtype(opts: LoadOptions, device: torch.device, path: Path) -> torch.dtype:
    """The dtype ``load_model`` will load the model at local ``path`` in (before loading it)."""
    from .sources import read_model_config

    folder = path if path.is_dir() else path.parent
    try:
        config = read_model_config(folder)
    except InputError:
        config = {}
    return load_dtype(opts.dtype, device, folder, config)


def numerics_tag(opts: LoadOptions, device: torch.device, path: Path) -> str:
    """What about the loading changes a model's activations, for cache keys of results computed
    from them: "" for the historic float32 unquantised load, else e.g. "bfloat16" or "float32+4bit"."""
    dt = dtype_name(planned_dtype(opts, device, path))
    if dt == "float32" and opts.quantization is None:
        return ""
    return dt + (f"+{opts.quantization}" if opts.quantization else "")
