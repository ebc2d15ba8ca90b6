"""Optimizers and schedules: Muon (the matrix part of MuonClip) and K2's warmup-stable-decay schedule."""

from k2.optim.muon import muon
from k2.optim.muon import newton_schulz
from k2.optim.schedules import wsd_schedule
from k2.optim.muonclip import muonclip
from k2.optim.muonclip import param_labels
from k2.optim.qk_clip import qk_clip
