"""Typed configuration: the model (read from a Hugging Face config.json) and the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral")
#: Ways attention may read the paged KV pool (see `attention_backends`).
ATTENTION_BACKENDS = ("auto", "cpu_paged", "flashinfer", "flash_attn", "dense")


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The decoder's shape, from a Hugging Face `config.json`.

    Llama, Mistral and Qwen2 are dense (Qwen2 adds a bias to q/k/v);
    Mixtral replaces every MLP with `num_experts` SwiGLU experts of which the
    router picks `num_experts_per_tok` per token.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling!r} is not supported; only unscaled RoPE is")
        num_heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_theta = raw.get("rope_theta")
        if rope_theta is None:  # newer transformers nest it under rope_parameters
            rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or raw.get("attention_bias", False),
            num_experts=raw.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) if model_type == "mixtral" else 0,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "ModelConfig":
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise ValueError(f"model path {model_path!s} has no config.json; pass a Hugging Face checkpoint directory")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(slots=True)
class EngineConfig:
    """How one engine instance runs. Defaults fit a laptop CPU and the default model."""

    model_path: str
    #: Tokens per KV block; also the granularity of prefix caching and of KV transfers.
    block_size: int = 16
    #: KV blocks in the pool. None sizes the pool from `kv_cache_bytes`.
    num_blocks: int | None = None
    #: Memory for the KV pool when `num_blocks` is None.
    kv_cache_bytes: int = 256 * 2**20
    #: Most sequences in one batch.
    max_num_seqs: int = 64
    #: Token budget of one engine step (decode tokens + prefill chunks); bounds step latency.
    max_num_batched_tokens: int = 512
    #: Longest prompt + output. None takes the model's `max_position_embeddings`.
    max_model_len: int | None = None
    #: "auto" takes CUDA when present, else CPU.
    device: str = "auto"
    #: "auto" is float32 on CPU and bfloat16 on CUDA.
    dtype: str = "auto"
    #: Reuse cached KV blocks across requests that share a prefix.
    enable_prefix_caching: bool = True
    #: Seeds the sampler of requests that carry no seed of their own.
    seed: int = 0
    #: Prefill side: how long a finished prompt's blocks wait for the decode worker to pull them.
    kv_hold_timeout_s: float = 30.0
    #: Decode side: how long a KV pull may take before the prompt is recomputed locally.
    kv_pull_timeout_s: float = 30.0
    #: How attention reads the paged KV pool: "auto" (the fastest that runs here), "cpu_paged",
    #: "flashinfer", "flash_attn" or "dense" (see `attention_backends`).
    attention_backend: str = "auto"
    #: CUDA only: run every decode step eagerly instead of replaying CUDA graphs captured at start.
    enforce_eager: bool = False
    #: Host-memory tier, in blocks: cached blocks evicted from the pool are kept there (pinned
    #: memory on CUDA) and copied back on a prefix hit. None sizes it from `kv_host_bytes`; 0 turns it off.
    kv_host_blocks: int | None = None
    #: Host-tier memory when `kv_host_blocks` is None (committed as blocks arrive).
    kv_host_bytes: int = 2**30
    #: Disk tier: a folder of this worker's own for blocks evicted from host memory. Empty: no disk tier.
    kv_disk_path: str = ""
    #: Disk tier, in blocks. None sizes it from `kv_disk_bytes`; 0 turns it off.
    kv_disk_blocks: int | None = None
    #: Disk space when `kv_disk_blocks` is None.
    kv_disk_bytes: int = 16 * 2**30
    #: Disk admission: a block leaving host memory is written to disk only if used at least this often.
    kv_disk_min_uses: int = 2
    #: How the tiers move bytes: "torch" (memmove / CUDA copies and file I/O) or "nixl" (NIXL's UCX and POSIX backends).
    kv_tier_transport: str = "torch"
    #: Expert-parallel ranks of an MoE model (1: every expert runs in this process). Ranks 1..N-1
    #: are child processes holding their share of the expert slots.
    ep_size: int = 1
    #: Expert slots beyond one per logical expert, for replicas of hot experts (ep_size > 1).
    eplb_redundant_experts: int = 0
    #: Engine steps between checks of the expert balance (0: never rearrange).
    eplb_interval: int = 0
    #: Steps of expert load the balance is judged and planned on.
    eplb_window: int = 1000
    #: Rearrange when the window's mean balancedness (mean over max rank load) is below this.
    eplb_threshold: float = 0.8

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use device='cpu' or 'auto'")
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype={self.dtype!r} is not one of auto, {', '.join(dtypes)}")
        return dtypes[self.dtype]

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= block_size ({self.block_size})"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        for name in ("kv_host_blocks", "kv_disk_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns the tier off), got {value}")
        if self.kv_disk_min_uses < 1:
            raise ValueError(f"kv_disk_min_uses must be >= 1, got {self.kv_disk_min_uses}")
        if self.kv_tier_transport not in ("torch", "nixl"):
            raise ValueError(f"kv_tier_transport must be torch or nixl, got {self.kv_tier_transport!r}")
        if self.kv_disk_path and self.kv_disk_blocks != 0 and self.kv_host_blocks == 0:
            raise ValueError(
                "the disk tier needs the host tier (blocks reach disk through host memory): "
                "set kv_host_blocks > 0, or leave kv_disk_path empty"
            )
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.eplb_redundant_experts < 0 or self.eplb_interval < 0:
            raise ValueError("eplb_redundant_experts and eplb_interval must be >= 0")
        if self.eplb_window < 1:
            raise ValueError(f"eplb_window must be >= 1 step, got {self.eplb_window}")
        if not 0.0 < self.eplb_threshold <= 1.0:
            raise ValueError(f"eplb_threshold must be in (0, 1], got {self.eplb_threshold}")
        if self.ep_size == 1 and (self.eplb_redundant_experts or self.eplb_interval):
            raise ValueError("eplb_redundant_experts and eplb_interval balance experts over ranks: set ep_size > 1 too")
