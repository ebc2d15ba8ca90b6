"""Agentic data synthesis (K2 report 3.1.1): tasks -> multi-turn tool-use trajectories -> a judge -> SFT data.

    from k2 import synth
    summary = synth.run('/tmp/synth', synth.SynthConfig(tasks_per_domain=600, shard_size=200))
    # /tmp/synth/judged/accepted-*.jsonl: conversations for k2.data.conversations.read (the SFT stage)

`pipeline` (the steps and the run), `shards` (atomic JSONL shards and the manifest that makes a run resumable),
`backends` (the agent interface: the scripted expert, an OpenAI-compatible HTTP client, our model via the sampler),
`judging` (programmatic state and rubric checks, an LLM judge, ANDing them; accepted trajectories as SFT conversations),
`toolspecs` (real tool specs loaded and checked, synthetic ones evolved, and their simulator), `agents` (each evolved
domain as a k2.gym Domain: a generated system prompt, a sampled tool subset, tasks from simple to complex with
rubrics). The tasks, tools, user simulators and reward come from k2.gym. Launcher: experiments/synth.py.
"""

from k2.synth.agents import TASK_TYPES, AgentDomain, evolved_agents
from k2.synth.backends import (Backend, Completion, ContextOverflow, ExpertBackend, ModelBackend, OpenAIBackend,
                               VariedExpertAgent, varied_expert_messages, with_slips)
from k2.synth.judging import (RUBRIC, Judge, LLMJudge, Verdict, all_of, conversation, judge, message_dict,
                              parse_verdict, task_rubric, transcript)
from k2.synth.pipeline import STEPS, SynthConfig, play, run, summary
from k2.synth.shards import Manifest, read_jsonl, write_atomic, write_jsonl
from k2.synth.toolspecs import SyntheticDomain, SyntheticTool, ToolSimulator, evolve_domains, load_tool_specs

__all__ = ['RUBRIC', 'STEPS', 'TASK_TYPES', 'AgentDomain', 'Backend', 'Completion', 'ContextOverflow', 'ExpertBackend',
           'Judge', 'LLMJudge', 'Manifest', 'ModelBackend', 'OpenAIBackend', 'SynthConfig', 'SyntheticDomain',
           'SyntheticTool', 'ToolSimulator', 'VariedExpertAgent', 'Verdict', 'all_of', 'conversation', 'evolve_domains',
           'evolved_agents', 'judge', 'load_tool_specs', 'message_dict', 'parse_verdict', 'play', 'read_jsonl', 'run',
           'summary', 'task_rubric', 'transcript', 'varied_expert_messages', 'with_slips', 'write_atomic',
           'write_jsonl']
