"""Loads a Hugging Face checkpoint directory (config.json + *.safetensors) into `CausalLM`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from triton_disagg.engine.config import ModelConfig
from triton_disagg.engine.model import CausalLM, rope_inv_freq

# Checkpoints written by newer transformers store Mixtral experts fused:
#   mlp.experts.gate_up_proj (E, 2I, H) and mlp.experts.down_proj (E, H, I).
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _checkpoint_tensors(model_path: Path):
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model path {model_path} has no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _rename(name: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Map one checkpoint tensor to this engine's parameter names."""
    if config.is_moe:
        name = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        name = re.sub(r"\.mlp\.experts\.(\d+)\.", r".block_sparse_moe.experts.\1.", name)
        fused = _FUSED_EXPERTS.match(name)
        if fused:
            layer, kind = fused.groups()
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            if kind == "down_proj":
                return [(f"{prefix}.{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
            gate, up = tensor.chunk(2, dim=1)
            return [(f"{prefix}.{e}.w1.weight", gate[e]) for e in range(tensor.shape[0])] + [
                (f"{prefix}.{e}.w3.weight", up[e]) for e in range(tensor.shape[0])
            ]
    return [(name, tensor)]


def load_model(model_path: str | Path, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Build the model for `model_path` and load every weight; missing or unexpected weights raise."""
    model_path = Path(model_path)
    config = ModelConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in the checkpoint; they were left uninitialised on the meta device.
    model.model.rotary_emb.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta).to(device)
    if config.is_moe:
        for layer in model.model.layers:
            layer.block_sparse_moe.expert_token_counts.zero_()

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for raw_name, raw_tensor in _checkpoint_tensors(model_path):
        if "rotary_emb.inv_freq" in raw_name:
            continue
        for name, tensor in _rename(raw_name, raw_tensor, config):
            if name not in params:
                raise ValueError(f"unexpected weight {raw_name!r} in {model_path}; is the checkpoint a {config.model_type}?")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"weight {raw_name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            with torch.no_grad():
                params[name].copy_(tensor.to(dtype))
            loaded.add(name)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model.eval()


_EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_RAW_EXPERT_LAYER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?:(\d+)\.)?")


def load_expert_weights(
    model_path: str | Path, wanted: dict[int, set[int]], device: torch.device, dtype: torch.dtype
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The weights of some experts only: `{(layer, expert): {"w1", "w2", "w3"}}` for each expert in `wanted[layer]`.

    Reads only the checkpoint tensors that hold them (legacy or fused layout).
    Raises ValueError when one is missing.
    """
    model_path = Path(model_path)
    config = ModelConfig.from_pretrained(model_path)
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    files = sorted(model_path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for raw_name in handle.keys():
                match = _RAW_EXPERT_LAYER.match(raw_name)
                if match is None or int(match.group(1)) not in wanted:
                    continue
                if match.group(2) is not None and int(match.group(2)) not in wanted[int(match.group(1))]:
                    continue
                for name, tensor in _rename(raw_name, handle.get_tensor(raw_name), config):
                    parsed = _EXPERT_WEIGHT.match(name)
                    if parsed and int(parsed.group(2)) in wanted.get(int(parsed.group(1)), ()):
                        key = (int(parsed.group(1)), int(parsed.group(2)))
                        found.setdefault(key, {})[parsed.group(3)] = tensor.to(device=device, dtype=dtype).contiguous()
    missing = [(layer, e) for layer, experts in wanted.items() for e in experts if len(found.get((layer, e), {})) != 3]
    if missing:
        raise ValueError(f"checkpoint {model_path} lacks the weights of (layer, expert) {missing[:3]}")
    return found
