"""Plain-jnp reference for the Newton-Schulz kernel: the one implementation Muon itself uses (k2/optim/muon.py)."""

from k2.optim.muon import newton_schulz as newton_schulz_reference
