"""Newton-Schulz orthogonalization (Muon's inner loop): Pallas kernels for TPU (Mosaic) beside the jnp reference."""

from pallas_kernels.newton_schulz.kernel import BlockSizes
from pallas_kernels.newton_schulz.ops import newton_schulz
from pallas_kernels.newton_schulz.ops import newton_schulz_steps
from pallas_kernels.newton_schulz.reference import NS_COEFFS
from pallas_kernels.newton_schulz.reference import newton_schulz_reference
from pallas_kernels.newton_schulz.reference import newton_schulz_steps_reference
from pallas_kernels.newton_schulz.reference import normalized_matrices
from pallas_kernels.newton_schulz.reference import normalizing_step
