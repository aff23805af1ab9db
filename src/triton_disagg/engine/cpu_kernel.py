"""The CPU paged-attention kernel (`csrc/paged_attention.c`): built once per machine, called through ctypes.

The C source ships with the package. At first use it is compiled with the
host's C compiler (`$CC`, else `cc`) for this CPU (`-march=native`: AVX2+FMA
where present) into a cache directory (`$TRITON_DISAGG_KERNEL_CACHE`, else
`~/.cache/triton-disagg/kernels`), under a name that hashes the source, the
flags, the compiler and the CPU, so a changed source or another machine gets
its own build. A build takes well under a second; processes that build at the
same time each write a temporary file and rename it into place.

It is built with OpenMP (`-fopenmp`) where the compiler has it, so it runs on
torch's OpenMP threads (see the source), else with POSIX threads of its own.
No compiler, or a failed build: `load_paged_attention()` returns None and the
engine falls back to attention over gathered KV (see `attention_backends`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_NAME = "paged_attention.c"
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
#: Tried first: the kernel then shares torch's OpenMP threads.
OPENMP_CFLAGS = ("-fopenmp",)


class PagedAttentionKernel:
    """The loaded library, with argument types declared once."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._decode = library.paged_decode_f32
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._decode.argtypes = [
            pointer, pointer, pointer, i64, i64, pointer, i64, pointer, i32, i32, i32, i32, i32, ctypes.c_float, pointer, i32,
        ]
        self._decode.restype = i32
        #: Whether this build uses AVX2+FMA (else plain C).
        self.is_simd = bool(library.paged_attention_simd())
        #: Whether it runs on the caller's OpenMP threads (else POSIX threads of its own).
        self.is_openmp = bool(library.paged_attention_openmp())

    def decode(
        self,
        q: torch.Tensor,  # (B, H, D) float32, contiguous
        k_cache: torch.Tensor,  # (N, BS, KVH, D) float32: one layer's K, a view of the pool
        v_cache: torch.Tensor,  # (N, BS, KVH, D) float32
        block_tables: torch.Tensor,  # (B, W) int64, contiguous; row b's first ceil(len/BS) entries are read
        seq_lens: torch.Tensor,  # (B,) int64, contiguous
        scale: float,
        num_threads: int,
    ) -> torch.Tensor:  # (B, H, D)
        """Decode attention read in place from the pool. Raises RuntimeError for an unsupported shape.

        The caller guarantees every block id read is inside the pool: the kernel does not check.
        """
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        if k_cache.stride()[1:] != (num_kv_heads * head_dim, head_dim, 1) or k_cache.stride() != v_cache.stride():
            raise RuntimeError("K and V caches must be views of one block-major pool with contiguous tokens")
        out = torch.empty_like(q)
        status = self._decode(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
            block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), num_seqs,
            num_heads, num_kv_heads, head_dim, block_size, scale, out.data_ptr(), num_threads,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"paged attention kernel failed with status {status}")
        return out


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_DISAGG_KERNEL_CACHE") or Path.home() / ".cache" / "triton-disagg" / "kernels")


@functools.cache
def load_paged_attention(extra_cflags: tuple[str, ...] = ()) -> PagedAttentionKernel | None:
    """The kernel built for this machine (built now if need be), or None when it cannot be built.

    `extra_cflags` build a variant, e.g. `("-mno-avx2",)` for the plain-C path in tests.
    """
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.warning("no C compiler (%s) found: CPU decode attention falls back to gathered KV", compiler)
        return None
    source = resources.files("triton_disagg.engine").joinpath("csrc", SOURCE_NAME).read_bytes()
    for flags in ((*CFLAGS, *OPENMP_CFLAGS, *extra_cflags), (*CFLAGS, *extra_cflags)):
        try:
            library_path = _build(compiler, source, flags)
            return PagedAttentionKernel(ctypes.CDLL(str(library_path)), library_path)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = exc.stderr.decode(errors="replace")[-2000:] if isinstance(exc, subprocess.CalledProcessError) else exc
            logger.warning("building the CPU paged-attention kernel with %s failed (%s)", " ".join(flags), detail)
    logger.warning("no CPU paged-attention kernel: decode attention falls back to gathered KV")
    return None


def _build(compiler: str, source: bytes, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), *version, _cpu_signature()])).hexdigest()[:20]
    target = kernel_cache_dir() / f"paged_attention-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source_path = target.with_suffix(f".{os.getpid()}.c")
    staged = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        source_path.write_bytes(source)
        subprocess.run([compiler, *flags, str(source_path), "-o", str(staged), "-lm"], capture_output=True, check=True)
        os.replace(staged, target)
    finally:
        source_path.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    logger.info("built the CPU paged-attention kernel: %s", target)
    return target


def _cpu_signature() -> bytes:
    """What `-march=native` depends on: the machine type and, on Linux, the CPU's model and flags."""
    signature = platform.machine().encode()
    try:
        for line in Path("/proc/cpuinfo").read_bytes().splitlines():
            if line.startswith((b"model name", b"flags", b"Features")):
                signature += line
                if line.startswith((b"flags", b"Features")):
                    break
    except OSError:
        pass
    return signature
