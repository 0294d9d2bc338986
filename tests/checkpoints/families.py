"""Tiny bases of every model family, their adapters in every format, and the independent reference.

The reference never calls lora_audit: the tuned weights come from peft's own merge where peft
supports the adapter, else from a hand merge written here (W + alpha/r * up @ down); each matrix is
read as (out x in) by the documented reshaping, written again here (conv kernels (out, in*k),
one matrix per expert of a fused stack); counts and max|cos| come from the float64 two-SVD
``tests.helpers.reference_intruders``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.cli import cli
from tests.helpers import reference_intruders

TOL = 1e-4


# ---- the reference ---------------------------------------------------------------------------------
def as_matrix(t: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The documented (out x in) reading of a stored weight, in float64."""
    t = t.detach().double()
    if t.dim() > 2:
        t = t.reshape(t.shape[0], -1)  # conv kernel (out, in, k...) -> (out, in*prod(k))
    return t.T if transposed else t


def expand_experts(state: dict[str, torch.Tensor], transposed: bool = False) -> dict[str, torch.Tensor]:
    """A fused (experts x out x in) stack "p" becomes matrices "p[e]" ((experts x in x out) ones transposed
    with ``transposed``); everything else unchanged."""
    out = {}
    for n, t in state.items():
        if t.dim() == 3 and not n.endswith(".weight") and ".experts." in f".{n}":
            for e in range(t.shape[0]):
                out[f"{n}[{e}]"] = t[e].T if transposed else t[e]
        else:
            out[n] = t
    return out


def reference(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], *, skip=lambda n: False,
              k: int = 10, epsilon: float = 0.5) -> dict[str, tuple[list[float], int]]:
    """name -> (max_cos, intruders) for every matrix (2 or more dims) that the merge changed."""
    out = {}
    for name, W0 in base.items():
        if W0.dim() < 2 or skip(name) or name not in tuned:
            continue
        a, b = as_matrix(W0), as_matrix(tuned[name])
        if not torch.equal(a, b):
            out[name] = reference_intruders(a, b, k=k, epsilon=epsilon)
    return out


def peft_merged_state(model, adapter_dir) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of ``adapter_dir`` on ``model`` (a fresh base model), as a state dict."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- running the CLI -----------------------------------------------------------------------------------
def run_spectrum(base, tuned, out: Path, *extra) -> dict:
    """`lora-audit spectrum BASE TUNED... --json out --float64` through the CLI; the parsed JSON.

    --float64: tiny random matrices have clustered singular values, so their singular vectors move
    by eps * sigma_1 / gap; in float64 that stays far below the 1e-4 the comparison asks for (the
    engine's float32 accuracy is the spectral tests' subject, not this file's)."""
    tuned = tuned if isinstance(tuned, (list, tuple)) else [tuned]
    r = CliRunner().invoke(cli, ["spectrum", str(base), *map(str, tuned), "--json", str(out), "--no-cache",
                                 "--device", "cpu", "--float64", *extra])
    assert r.exit_code == 0, r.output
    obj = json.loads(out.read_text())
    obj["_summary"] = r.output
    page = out.with_suffix(".html")  # `report` renders every family's result
    rr = CliRunner().invoke(cli, ["report", str(out), "--out", str(page), "--no-csv"])
    assert rr.exit_code == 0 and page.stat().st_size > 0, rr.output
    return obj


def assert_matches(result: dict, ref: dict[str, tuple[list[float], int]]) -> dict[str, dict]:
    """Every matrix of the result is in the reference and the other way round; same counts, max|cos|
    within TOL. Returns the result's matrices by name."""
    got = {m["name"]: m for m in result["matrices"]}
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))
    for name, (cos, count) in ref.items():
        assert got[name]["intruders"] == count, name
        assert len(got[name]["max_cos"]) == len(cos), name
        assert max(abs(a - b) for a, b in zip(got[name]["max_cos"], cos, strict=True)) < TOL, name
    assert result["total_intruders"] == sum(c for _, c in ref.values())
    return got


def randomize_lora(model, scale: float = 0.2, seed: int = 1) -> None:
    """Fill every LoRA B (PEFT initialises it to zero) so the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_adapter(model, out: Path, seed: int = 1, **lora_kw) -> Path:
    """A real PEFT LoRA adapter made with peft on ``model`` (random factors), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(**lora_kw))
    randomize_lora(pm, seed=seed)
    pm.save_pretrained(str(out), safe_serialization=True)
    return out


# ---- kohya / sd-scripts ---------------------------------------------------------------------------------
def kohya_factors(stored: torch.Tensor, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) for a stored weight: linear (r, in) / (out, r); conv (LoCon): a kernel
    (r, in, kh, kw) and a 1x1 up (out, r, 1, 1), as sd-scripts saves them."""
    if stored.dim() == 4:
        out, cin, kh, kw = stored.shape
        return torch.randn(rank, cin, kh, kw, generator=g) * 0.3, torch.randn(out, rank, 1, 1, generator=g) * 0.3
    out, cin = stored.shape
    return torch.randn(rank, cin, generator=g) * 0.3, torch.randn(out, rank, generator=g) * 0.3


def kohya_merge(W: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """sd-scripts networks/merge_lora.py: W + alpha/r * up @ down; a 3x3 conv LoRA merges as
    conv2d(down^T, up)^T (the composition of the two convolutions)."""
    scale = alpha / down.shape[0]
    if W.dim() == 2:
        return W + scale * (up.double() @ down.double()).to(W.dtype)
    if down.shape[2:] == (1, 1):
        return W + scale * (up.double().squeeze(3).squeeze(2) @ down.double().squeeze(3).squeeze(2))[:, :, None, None]
    conved = torch.nn.functional.conv2d(down.double().permute(1, 0, 2, 3), up.double()).permute(1, 0, 2, 3)
    return W + scale * conved


def write_kohya(path: Path, targets: dict[str, tuple[str, torch.Tensor]], rank: int, alphas: dict[str, float],
                seed: int = 3) -> dict[str, torch.Tensor]:
    """Write a kohya LoRA file: ``targets[kohya name] = (base param, stored W)``; returns the hand-merged
    tuned weights by base param."""
    g = torch.Generator().manual_seed(seed)
    tensors, merged = {}, {}
    for kname, (param, W) in targets.items():
        down, up = kohya_factors(W, rank, g)
        tensors[f"{kname}.lora_down.weight"] = down.contiguous()
        tensors[f"{kname}.lora_up.weight"] = up.contiguous()
        tensors[f"{kname}.alpha"] = torch.tensor(alphas[kname])
        merged[param] = kohya_merge(W.double(), down, up, alphas[kname])
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return merged


def kohya_name(prefix: str, module: str) -> str:
    """sd-scripts networks/lora.py: lora_name = prefix + "." + module path, dots replaced by "_"."""
    return (prefix + "." + module).replace(".", "_")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---- diffusion ------------------------------------------------------------------------------------------
def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, projection_dim=16))


def tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """A diffusers pipeline folder: model_index.json, unet/ and text_encoder/ (weights), as
    StableDiffusionPipeline.save_pretrained lays it out (scheduler and tokenizer hold no weights)."""
    torch.manual_seed(seed)
    tiny_unet().save_pretrained(folder / "unet")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return folder


def pipeline_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a pipeline folder, named "<component>.<parameter>" (diffusers' LoRA naming)."""
    out = {}
    for comp in ("unet", "text_encoder"):
        f = next((folder / comp).glob("*.safetensors"))
        out.update({f"{comp}.{k}": v for k, v in load_file(str(f)).items()})
    return out


def peft_on(model, seed: int = 1, **lora_kw):
    """``model`` with a peft LoRA injected (random factors): (PeftModel, its LoRA state dict without
    the "base_model.model." prefix, the LoraConfig as a dict)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(**lora_kw)
    pm = get_peft_model(model, cfg)
    randomize_lora(pm, seed=seed)
    sd = {k.removeprefix("base_model.model."): v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    return pm, sd, cfg.to_dict()


def single_file_sdxl(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file checkpoint in the original SDXL layout (sgm): the UNet under
    "model.diffusion_model." with input_blocks / middle_block / output_blocks names, text encoder 1
    (Hugging Face CLIP) under "conditioner.embedders.0.transformer.", the VAE under
    "first_stage_model."; a few tensors of each kind, random (the test builds it, no download)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / (shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)) ** 0.5

    u, c = "model.diffusion_model.", 16
    tensors = {u + "input_blocks.0.0.weight": w(c, 4, 3, 3), u + "input_blocks.1.0.in_layers.2.weight": w(c, c, 3, 3),
               u + "input_blocks.1.0.emb_layers.1.weight": w(c, 64), u + "input_blocks.1.1.proj_in.weight": w(c, c),
               u + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": w(c, c),
               u + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": w(c, c),
               u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": w(c, 16),
               u + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": w(4 * c, c),
               u + "middle_block.1.proj_out.weight": w(c, c), u + "out.2.weight": w(4, c, 3, 3),
               u + "input_blocks.1.0.in_layers.2.bias": torch.zeros(c),
               "first_stage_model.decoder.conv_in.weight": w(8, 4, 3, 3)}
    torch.manual_seed(seed)
    tensors.update({f"conditioner.embedders.0.transformer.{k}": v.detach().clone()
                    for k, v in tiny_text_encoder().state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return tensors


def lora_factors(base_w: dict[str, torch.Tensor], modules: dict[str, str], *, r: int, alpha: float,
                 prefix: str = "base_model.model.", seed: int = 5, key=lambda module, part: f"{module}.{part}.weight"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random LoRA factors for ``modules`` (adapter module -> base parameter), keyed
    ``prefix + key(module, "lora_A")``, and the hand-merged tuned weights W + alpha/r B A (float64)."""
    g = torch.Generator().manual_seed(seed)
    tensors, merged = {}, {}
    for module, param in modules.items():
        W = base_w[param].double()
        A = torch.randn(r, W.shape[1], generator=g) * 0.3
        B = torch.randn(W.shape[0], r, generator=g) * 0.3
        tensors[prefix + key(module, "lora_A")], tensors[prefix + key(module, "lora_B")] = A, B
        merged[param] = W + alpha / r * (B.double() @ A.double())
    return tensors, merged


def hand_lora(path: Path, base_w: dict[str, torch.Tensor], modules: dict[str, str], *, config: dict | None = None,
              **kw) -> dict[str, torch.Tensor]:
    """``lora_factors`` written to ``path`` (with adapter_config.json when ``config`` is given); the
    hand-merged tuned weights."""
    tensors, merged = lora_factors(base_w, modules, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    if config is not None:
        (path.parent / "adapter_config.json").write_text(json.dumps(config))
    return merged


def update_cos(dWs: list[torch.Tensor]) -> list[list[float]]:
    """cos of the angle between flattened updates (the Frobenius inner product), float64."""
    flat = torch.stack([d.double().reshape(-1) for d in dWs])
    flat = flat / flat.norm(dim=1, keepdim=True)
    return (flat @ flat.T).tolist()


# ---- quantised bases ------------------------------------------------------------------------------------
def fp8_folder(src: Path, dst: Path, block: int = 16) -> Path:
    """A copy of the float model folder ``src`` with its projection weights in FP8 e4m3 with one scale
    per (block x block) tile, as transformers' FineGrainedFP8 / DeepSeek-V3 checkpoints store them:
    ``<w>.weight`` float8_e4m3fn and ``<w>.weight_scale_inv`` float32, W = fp8 * scale."""
    dst.mkdir(parents=True)
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith("proj.weight"):
            r, c = v.shape
            scale = v.reshape(r // block, block, c // block, block).abs().amax(dim=(1, 3)) / 448.0  # e4m3 max
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            out[k], out[k + "_scale_inv"] = (v / full).to(torch.float8_e4m3fn), scale.float()
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block],
                                  "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def bnb4_reference(folder: Path) -> dict[str, torch.Tensor]:
    """The 4-bit weights of a bitsandbytes folder dequantised by the format's definition, written
    independently of lora_audit (bitsandbytes' own CPU dequantize_4bit is wrong when a block spans two
    rows): value j = quant_map[nibble j] * absmax[j // blocksize], high nibble first; with double
    quantisation absmax = nested_quant_map[absmax] * nested_absmax[block // nested_blocksize] + offset."""
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for key, t in sd.items():
        if ".quant_state.bitsandbytes__" not in key:
            continue
        w = key.split(".quant_state.")[0]
        qs = json.loads(bytes(t.tolist()).decode())
        rows, cols = qs["shape"]
        nib = torch.stack([sd[w].reshape(-1).long() >> 4, sd[w].reshape(-1).long() & 15], 1).reshape(-1)
        absmax = sd[w + ".absmax"].double()
        if "nested_blocksize" in qs:
            nested = sd[w + ".nested_absmax"].double().repeat_interleave(qs["nested_blocksize"])
            codes = sd[w + ".nested_quant_map"].double()[absmax.long()]
            absmax = codes * nested[: absmax.numel()] + qs["nested_offset"]
        vals = sd[w + ".quant_map"].double()[nib] * absmax.repeat_interleave(qs["blocksize"])[: nib.numel()]
        out[w] = vals[: rows * cols].reshape(rows, cols)
    return out
