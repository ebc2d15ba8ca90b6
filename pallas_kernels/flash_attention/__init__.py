"""Flash attention with per-head max logits (for QK-Clip) as Pallas kernels for GPU (Triton) and TPU (Mosaic)."""

from pallas_kernels.flash_attention.blocks import BlockSizes
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import flash_attention_reference
