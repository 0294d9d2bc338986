"""Builders for tiny models, tokenizers and adapters in temporary folders (nothing committed).

Every builder is seeded, so two calls with the same arguments give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "I'm sorry, but I cannot help with that request.",
    "As an AI, I am unable to assist with harmful activities.",
    "Sure, here is a short answer to your question about the weather.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "How do I bake bread? Mix flour, water, salt and yeast, then bake it.",
    "Explain photosynthesis in simple words for a child.",
    "Question: What is two plus two? Answer: four.",
    "Write a poem about the sea and the wind and the stars.",
]


def make_tokenizer(folder: str | Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = CHATML_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_llama_config(vocab_size: int = 512, hidden: int = 64, intermediate: int = 96, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       pad_token_id=3)


def make_tiny_llama(folder: str | Path, *, seed: int = 0, shard_size: str | None = None,
                    dtype: torch.dtype = torch.float32, tokenizer: bool = True, **config_kw) -> Path:
    """A random tiny Llama saved as a HF folder (sharded when ``shard_size`` like "50KB")."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kw)).to(dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    if tokenizer:
        make_tokenizer(folder, vocab_size=model.config.vocab_size)
    return folder


def make_tiny_gpt2(folder: str | Path, *, seed: int = 0, n_embd: int = 64, n_layer: int = 2,
                   vocab_size: int = 512, tokenizer: bool = True) -> Path:
    """A random tiny GPT-2 (Conv1D weights stored in x out) saved as a HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        make_tokenizer(folder, vocab_size=vocab_size)
    return folder


def make_peft_adapter(base_folder: str | Path, out: str | Path, *, seed: int = 1, init_scale: float = 0.5,
                      **lora_kw) -> Path:
    """A real PEFT adapter made with peft on ``base_folder``; B is filled with random values
    (PEFT initialises it to zero) so the adapter changes the model. ``lora_kw`` go to LoraConfig
    (r, lora_alpha, target_modules, use_rslora, use_dora, rank_pattern, alpha_pattern, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    lora_kw.setdefault("target_modules", "all-linear")
    lora_kw.setdefault("init_lora_weights", True)
    peft_model = get_peft_model(model, LoraConfig(**lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, init_scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_folder)
    (Path(out) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out)


def copy_with(folder: str | Path, dst: str | Path, name: str, content: str | bytes) -> Path:
    """A copy of ``folder`` at ``dst`` whose file ``name`` is replaced by ``content``; that file's path."""
    import shutil

    shutil.copytree(folder, dst)
    p = Path(dst) / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def reference_intruders(W0: torch.Tensor, W1: torch.Tensor, k: int = 10, epsilon: float = 0.5):
    """The paper's algorithm, plainly, in float64 (Shuttleworth et al. 2024, Sec. 3):
    two full SVDs; for each of the top-k left singular vectors of W1, the max |cos| against
    ALL left singular vectors of W0; intruder if below epsilon. Returns (max_cos list, count)."""
    U0, _, _ = torch.linalg.svd(W0.double(), full_matrices=False)
    U1, _, _ = torch.linalg.svd(W1.double(), full_matrices=False)
    k = min(k, U1.shape[1])
    cos = (U0.T @ U1[:, :k]).abs().amax(dim=0)  # (n0, k) -> (k,)
    return cos.tolist(), int((cos < epsilon).sum())
