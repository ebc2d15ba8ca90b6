"""Optimizers and schedules: MuonClip (Muon + AdamW, then QK-Clip and router balancing) and K2's WSD schedule."""

from k2.optim.muon import muon
from k2.optim.muon import newton_schulz
from k2.optim.schedules import wsd_schedule
from k2.optim.muonclip import muon_adamw
from k2.optim.muonclip import post_update
from k2.optim.muonclip import param_labels
from k2.optim.qk_clip import qk_clip
