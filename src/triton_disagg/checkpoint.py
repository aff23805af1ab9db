"""Writes the default model: a tiny, deterministically initialised Hugging Face checkpoint.

No weights can be downloaded in every environment this project runs in, so
`triton-disagg make-model` builds one: `config.json`, `model.safetensors`,
`generation_config.json`, and a byte-level `tokenizer.json` (one token per
byte, plus `<s>`, `</s>`, `<pad>`). The weights are random (seeded), so the
text it writes is noise, but every code path is the one a real checkpoint takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

NUM_BYTE_TOKENS = 256
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258

#: Architecture of each variant. Small enough for a 2-core CPU, with GQA (4 query heads, 2 KV heads).
VARIANTS: dict[str, dict] = {
    "dense": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
    },
    "moe": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.0,
    },
}

COMMON_CONFIG = {
    "vocab_size": 259,  # 256 bytes + 3 specials
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "torch_dtype": "float32",
}

#: Used by OpenAI-style chat endpoints when a checkpoint has no template of its own.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte (id == byte value), `<s>` prepended to every encoding."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS, PAD])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tokenizer


def _init_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator) * 0.1  # noqa: E731
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, heads, kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    weights = {
        "model.embed_tokens.weight": normal(config["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": normal(config["vocab_size"], hidden),
    }
    # Longer rows for printable ASCII make it the likeliest output, so the noise this model
    # writes reads as text rather than as replacement characters.
    weights["lm_head.weight"][ord(" ") : ord("~") + 1] *= 3.0
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": torch.ones(hidden),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{p}.self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        }
        if config["model_type"] == "mixtral":
            weights[f"{p}.block_sparse_moe.gate.weight"] = normal(config["num_local_experts"], hidden)
            for e in range(config["num_local_experts"]):
                q = f"{p}.block_sparse_moe.experts.{e}"
                weights |= {f"{q}.w1.weight": normal(inter, hidden), f"{q}.w3.weight": normal(inter, hidden), f"{q}.w2.weight": normal(hidden, inter)}
        else:
            weights |= {
                f"{p}.mlp.gate_proj.weight": normal(inter, hidden),
                f"{p}.mlp.up_proj.weight": normal(inter, hidden),
                f"{p}.mlp.down_proj.weight": normal(hidden, inter),
            }
    return weights


def write_tokenizer_files(path: Path, max_model_len: int) -> None:
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": max_model_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def make_model(path: str | Path, variant: str = "dense", seed: int = 0, config_overrides: dict | None = None) -> Path:
    """Write the `variant` checkpoint to `path` (created if needed); the same seed gives the same bytes.

    `config_overrides` change config.json fields (e.g. `num_local_experts`) before the weights are drawn.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = COMMON_CONFIG | VARIANTS[variant] | (config_overrides or {})
    save_file(_init_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    write_tokenizer_files(path, config["max_position_embeddings"])
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="dense")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_model(args.path, args.variant, args.seed))


if __name__ == "__main__":
    main()
