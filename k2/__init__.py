"""k2: a JAX research codebase for Kimi K2 (MLA + MoE, MuonClip, SFT, RL)."""
