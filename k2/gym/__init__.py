"""Environments shared by data synthesis, agent evaluation and RL: offline tau-bench-style domains with a real
database, tools over it, a policy, tasks with a hidden user goal and gold actions, and a verifiable reward.

    from k2 import gym
    domain = gym.domains.get('retail')                    # also 'calendar', 'files', 'calculator', 'bank'
    task = domain.sample_tasks(1, seed=0, split='train')[0]
    env = gym.ToolEnv(domain)
    episode = gym.run_episode(env, gym.ExpertAgent(task), task)   # any agent: history -> Message or raw text
    episode.reward, episode.info['tool_errors']

`env` (the protocol, tasks, tools, success), `user` (simulated users), `expert` (the scripted expert),
`domains/` (one file per domain), `episodes` (many episodes stepped together: `run_episodes`, so a model samples
every live episode's turn in one batch), `evaluation` (pass^k, tool-call validity, argument match per domain),
`verifiable/` (RL tasks with rewards checked by code: arithmetic, 24-game, sudoku, instruction following, code),
`sandbox` (untrusted code in an isolated process). No model code: agents are plain callables.
"""

from k2.gym import domains
from k2.gym.env import (KINDS, SPLITS, TRANSIENT_ERROR, Agent, Domain, Episode, Fact, StepResult, Task, Tool, ToolEnv,
                        execute, fact_told, gold_state, is_refusal, make_tool, run_episode)
from k2.gym.episodes import Responder, agents_responder, model_responder, run_episodes
from k2.gym.expert import ExpertAgent, expert_messages
from k2.gym.user import STOP, BackendUser, Completer, ScriptedUser, UserSimulator, UserTurn, backend_user_factory

__all__ = ['KINDS', 'SPLITS', 'STOP', 'TRANSIENT_ERROR', 'Agent', 'BackendUser', 'Completer', 'Domain', 'Episode',
           'ExpertAgent', 'Fact', 'Responder', 'ScriptedUser', 'StepResult', 'Task', 'Tool', 'ToolEnv', 'UserSimulator',
           'UserTurn', 'agents_responder', 'backend_user_factory', 'domains', 'execute', 'expert_messages', 'fact_told', 'gold_state',
           'is_refusal', 'make_tool', 'model_responder', 'run_episode', 'run_episodes']
