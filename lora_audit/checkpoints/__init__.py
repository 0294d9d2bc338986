"""Loading: what a checkpoint is, and the stream of (name, W0, deltas) the spectral engine eats.

Public API:
    detect(path) -> Kind                  what a path is (HF/diffusers folder, pipeline, adapter, GGUF, ...)
    read_adapter(path) -> AdapterFile     the one adapter reader (PEFT folder, kohya or diffusers LoRA file)
    read_adapter_set(path) -> AdapterSet  MixLoRA / X-LoRA: one AdapterFile per LoRA expert, the router
    plan_matrices(shapes, config)         which tensors are matrices, read how (conv, experts); what is skipped
    match_adapter(af, base_shapes)        which base parameter each adapter module changes, or
                                          ShapeMismatchError (models.match_adapter_to_model: on a loaded model)
    load_model(source, base=...)          a whole causal LM + tokenizer (generation, training)
    open_stream(base, [tuned, ...])       the validated (name, W0, deltas) stream for the spectral audit
    default_model_dir()                   the embedded SmolLM2-135M-Instruct as a HF folder
    Dense / LowRank / DoRA / MatrixGroup  the delta types of the stream (deltas.py)
"""

from .adapter_sets import AdapterSet, read_adapter_set
from .adapters import AdapterFile, AdapterMatch, match_adapter, read_adapter
from .deltas import Delta, Dense, DoRA, LowRank, MatrixGroup, is_changed, materialize
from .detect import Kind, detect
from .layout import Matrix, plan_matrices
from .models import LoadedModel, load_model
from .stream import AuditStream, open_stream

__all__ = ["AdapterFile", "AdapterMatch", "AdapterSet", "Matrix", "match_adapter", "plan_matrices", "read_adapter",
           "read_adapter_set", "Delta", "Dense", "DoRA", "LowRank", "MatrixGroup", "is_changed", "materialize", "Kind", "detect",
           "LoadedModel", "load_model", "AuditStream", "open_stream"]
