"""Newton-Schulz orthogonalization (Muon's inner loop) as fused Pallas kernels for GPU (Triton) and TPU (Mosaic)."""

from pallas_kernels.newton_schulz.kernel import BlockSizes
from pallas_kernels.newton_schulz.ops import newton_schulz
from pallas_kernels.newton_schulz.reference import newton_schulz_reference
