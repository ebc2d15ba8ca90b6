"""QK-Clip's in-place head rescale as a Pallas kernel."""

from pallas_kernels.qk_clip.ops import rescale_heads
