"""InfLLM v2 configuration: a frozen, validated dataclass plus derived sizes.

Field names and defaults follow MiniCPM4's ``sparse_config`` (spec ``infllm_v2.md`` §1). Generation
"B" (default) is the InfLLM-V2 paper / MiniCPM4.1 / SALA algorithm; "A" is the June-2025 MiniCPM4-8B
code (exact softmax, local blocks excluded from top-k and added by the attention window).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class InfLLMv2Config:
    """Hyper-parameters of InfLLM v2 sparse attention (see spec §1 and §3)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    generation: str = "B"
    lse_approx: bool = True

    def __post_init__(self):
        errors = []
        for name in ("kernel_size", "kernel_stride", "block_size", "window_size", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                errors.append(f"{name}={value!r} must be a positive int")
        if not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            errors.append(f"init_blocks={self.init_blocks!r} must be an int >= 0")
        if not isinstance(self.dense_len, int) or self.dense_len < -1:
            errors.append(f"dense_len={self.dense_len!r} must be an int >= -1 (-1 or 0: always sparse)")
        if self.generation not in ("A", "B"):
            errors.append(f"generation={self.generation!r} must be 'A' or 'B'")
        if errors:
            raise ValueError("InfLLMv2Config: " + "; ".join(errors))
        if self.kernel_size != 2 * self.kernel_stride:
            errors.append(
                f"kernel_size={self.kernel_size} must equal 2 * kernel_stride "
                f"(= {2 * self.kernel_stride}), as the spec's max-pool assumes"
            )
        if self.block_size % self.kernel_stride:
            errors.append(f"block_size={self.block_size} must be a multiple of kernel_stride={self.kernel_stride}")
        if self.window_size % self.block_size:
            errors.append(f"window_size={self.window_size} must be a multiple of block_size={self.block_size}")
        forced = self.init_blocks + (self.local_blocks + 1 if self.generation == "B" else 0)
        if self.generation == "B" and self.num_selected < forced:
            errors.append(
                f"topk={self.topk}: topk + local_blocks ({self.num_selected}) is smaller than "
                f"the forced blocks (init {self.init_blocks} + local {self.local_blocks + 1})"
            )
        if self.generation == "A" and self.topk < self.init_blocks:
            errors.append(f"topk={self.topk} is smaller than init_blocks={self.init_blocks}")
        if errors:
            raise ValueError("InfLLMv2Config: " + "; ".join(errors))

    @property
    def local_blocks(self) -> int:
        """window_size // block_size (32 with the defaults)."""
        return self.window_size // self.block_size

    @property
    def num_selected(self) -> int:
        """Width of the selection list: topk + local (gen B) or topk (gen A)."""
        return self.topk + self.local_blocks if self.generation == "B" else self.topk

    @property
    def attended_blocks(self) -> int:
        """Width of the block list given to the attention (gen A adds the local window)."""
        return self.topk + self.local_blocks

    @property
    def pool_stride(self) -> int:
        """Compressed keys per block (4 with the defaults); max-pool kernel is pool_stride + 1."""
        return self.block_size // self.kernel_stride

    @property
    def use_lse_approx(self) -> bool:
        """The coarse-key LSE approximation only exists in generation B."""
        return self.lse_approx and self.generation == "B"

    def is_dense(self, kv_len: int) -> bool:
        """True when a total length kv_len takes the dense path (kv_len < dense_len)."""
        return self.dense_len > 0 and kv_len < self.dense_len

    def num_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.block_size)
