"""Grouped (ragged) matmul for tokens sorted by expert, as Pallas kernels for GPU (Triton) and TPU (Mosaic)."""

from pallas_kernels.grouped_matmul.ops import grouped_matmul
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tiling import BlockSizes
from pallas_kernels.grouped_matmul.tiling import ProductBlocks
