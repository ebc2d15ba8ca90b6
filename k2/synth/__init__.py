"""Agentic data synthesis (K2 report 3.1.1): tasks -> multi-turn tool-use trajectories -> a judge -> SFT data.

    from k2 import synth
    summary = synth.run('/tmp/synth', synth.SynthConfig(tasks_per_domain=600, shard_size=200))
    # /tmp/synth/judged/accepted-*.jsonl: conversations for k2.data.conversations.read (the SFT stage)

`pipeline` (the steps and the run), `shards` (atomic JSONL shards and the manifest that makes a run resumable),
`backends` (the agent interface: the scripted expert, and where an HTTP client or our sampler plug in), `judge`
(programmatic state and rubric checks; accepted trajectories as SFT conversations). The tasks, tools, user
simulator and reward come from k2.gym. Launcher: experiments/synth.py.
"""

from k2.synth.backends import (Backend, Completion, ContextOverflow, ExpertBackend, ModelBackend, VariedExpertAgent,
                               varied_expert_messages)
from k2.synth.judging import Verdict, conversation, judge, message_dict
from k2.synth.pipeline import STEPS, SynthConfig, play, run, summary
from k2.synth.shards import Manifest, read_jsonl, write_atomic, write_jsonl

__all__ = ['STEPS', 'Backend', 'Completion', 'ContextOverflow', 'ExpertBackend', 'ModelBackend', 'Manifest', 'SynthConfig', 'VariedExpertAgent', 'Verdict',
           'conversation', 'judge', 'message_dict', 'play', 'read_jsonl', 'run', 'summary', 'varied_expert_messages',
           'write_atomic', 'write_jsonl']
