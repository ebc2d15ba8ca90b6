"""MLA decode attention over the latent cache (absorbed form, length-aware) as Pallas kernels for GPU (Triton)
and TPU (Mosaic)."""

from pallas_kernels.mla_decode.blocks import BlockSizes
from pallas_kernels.mla_decode.ops import mla_decode
from pallas_kernels.mla_decode.reference import mla_decode_reference
