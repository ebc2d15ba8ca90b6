"""The one interface every agent policy of the synthesis pipeline speaks, and its implementations.

A `Backend` makes the agent of one episode: `backend.agent(task, tools, seed)` returns a k2.gym Agent, a callable
history (list of k2.chat.Message) -> the next assistant Message, or the model's raw output text (k2.gym.ToolEnv
parses its tool calls with k2.chat). Whatever an agent does, the run goes on: an agent that raises (a timeout, an
HTTP 5xx) ends its episode, scored as it stands with the error in info['agent_error'] (k2.gym.run_episode), and the
judge rejects it with that reason; malformed output is counted by the environment and rejected by the judge.
A model-backed backend also has `complete(messages, tools=None) -> Message`, one chat completion: what the LLM
judge (k2.synth.judging.LLMJudge) and the LLM user (k2.gym.BackendUser) talk through.

Implementations:
  ExpertBackend  the scripted expert (k2.gym.ExpertAgent's plan: gold actions, the question for a withheld fact,
                 the closing line or the refusal), with its own wording varied per (task, seed): a short line before
                 some tool calls, an opening and a closing around the final message, and K2-style call ids. A call
                 answered k2.gym.TRANSIENT_ERROR (ToolEnv.failure_rate) is retried once, so trajectories teach
                 recovery.
  OpenAIBackend  any OpenAI-compatible endpoint (our experiments/serve.py, vLLM, a hosted API) through the official
                 `openai` client: the agent sends the history and the tool declarations, and nothing of the task
                 (it sees only what a deployed model sees). Timeouts, 5xx and unreadable answers raise: the episode
                 is rejected, the run continues.
  ModelBackend   our own model through the sampler: the history rendered with k2.chat (tools declared, generation
                 prompt appended), sampled up to <|im_end|> by k2.sample.engine.rollout and returned as raw text;
                 `complete_batch` samples many conversations at once with their token ids and log-probs (agent
                 evaluation and RL step all live episodes together: k2.gym.episodes).
The backend's `name` goes into the run's config, so shards of two backends never mix in one output directory.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import openai

from k2 import chat
from k2.chat import Message, ToolCall
from k2.gym import TRANSIENT_ERROR, Agent, Task, expert_messages
from k2.synth.judging import message_dict

# The expert's own wording, varied per (task, seed); none of these reads as a refusal (k2.gym.is_refusal), asks to
# confirm (the scripted user would answer yes) or holds a number (k2.gym.fact_told would count it).
BEFORE_CALL = ('', '', '', 'Let me check that.', 'One moment.', 'Looking that up now.', 'Let me take care of that.',
               'Checking.', 'I will handle that now.')
OPENING = {'act': ('', '', 'Okay.', 'All right.', 'Sure thing.', 'Thanks for waiting.', 'Here you go.'),
           'refuse': ('', '', 'I looked into it.', 'Thanks for your patience.', 'I checked the details.')}
CLOSING = ('', '', 'Anything else I can help with?', 'Let me know if there is anything else.',
           'Is there anything else you need?', 'Have a good day!')
RETRY = ('', 'That did not go through, trying again.', 'The service hiccuped; retrying.', 'Let me try that again.')


class Backend(Protocol):
  """Makes the agent of one episode (see the module docstring)."""
  name: str

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent: ...


def _join(*parts: str) -> str:
  return ' '.join(part for part in parts if part)


def varied_expert_messages(task: Task, seed: int) -> list[Message]:
  """k2.gym.expert_messages(task) with the wording varied by (task, seed) and call ids `functions.<name>:<k>`
  (K2's format: k counts the calls in the conversation). Tool calls, arguments and the facts told are unchanged."""
  rng = random.Random(f'{task.task_id}/expert/{seed}')  # str seeds hash the same in every process
  plan, calls = [], 0
  for message in expert_messages(task):
    if message.tool_calls:
      ids = []
      for call in message.tool_calls:
        ids.append(dataclasses.replace(call, id=f'functions.{call.name}:{calls}'))
        calls += 1
      plan.append(Message('assistant', rng.choice(BEFORE_CALL), tool_calls=tuple(ids)))
    else:
      plan.append(message)
  final = plan[-1]
  opening = rng.choice(OPENING['refuse' if task.kind == 'refuse' else 'act'])
  plan[-1] = Message('assistant', _join(opening, final.content, rng.choice(CLOSING)))
  return plan


def _failed_calls(messages: Sequence[Message]) -> tuple[int, list[ToolCall], bool]:
  """(plan messages sent, the calls of the last assistant message answered TRANSIENT_ERROR, whether that message
  was itself a retry). A message right after a failure is a retry, unless it follows a retry: one retry per call."""
  sent, failed, retry, calls, answered = 0, [], False, (), 0
  for message in messages:
    if message.role == 'assistant':
      retry = bool(failed) and not retry
      sent += not retry
      failed, calls, answered = [], message.tool_calls, 0
    elif message.role == 'tool':  # tool results answer the calls in order
      if message.content == TRANSIENT_ERROR and answered < len(calls):
        failed.append(calls[answered])
      answered += 1
  return sent, failed, retry


def with_slips(plan: Sequence[Message], task: Task, tools: Sequence[Mapping[str, Any]], seed: int, rate: float,
               decoys: Sequence[str] = ()) -> list[Message]:
  """`plan` with, before each of its single-call messages and with probability `rate`, a slip the next message
  recovers from: the same call under a tool name of another domain (`decoys`: names the agent's `tools` lack) or
  with one required argument left out. A slip has weight 0 (in the context, out of the SFT loss) and the
  environment refuses it (unknown tool, invalid arguments) without running anything, so a model trained on the
  recoveries learns what to do after such an error message, never to make the error."""
  rng = random.Random(f'{task.task_id}/slip/{seed}')
  names = {spec['function']['name'] for spec in tools}
  required = {spec['function']['name']: spec['function'].get('parameters', {}).get('required', []) for spec in tools}
  foreign = sorted(set(decoys) - names)
  out = []
  for message in plan:
    if len(message.tool_calls) == 1 and rng.random() < rate:
      call = message.tool_calls[0]
      droppable = [key for key in required.get(call.name, ()) if key in call.arguments]
      if foreign and (not droppable or rng.random() < 0.5):
        slip = dataclasses.replace(call, name=rng.choice(foreign))
      elif droppable:
        drop = rng.choice(droppable)
        slip = dataclasses.replace(call, arguments={k: v for k, v in call.arguments.items() if k != drop})
      else:
        slip = None
      if slip is not None:
        out.append(Message('assistant', message.content, tool_calls=(slip,), weight=0))
    out.append(message)
  return out


class VariedExpertAgent:
  """An Agent replaying `varied_expert_messages(task, seed)` (with `with_slips` where slip_rate > 0), a pure function
  of the history (it counts its own past messages); a call that failed transiently is sent again once, in a message
  of its own; past its plan it asks what else. Call ids count the calls in the conversation, retries included."""

  def __init__(self, task: Task, seed: int = 0, tools: Sequence[Mapping[str, Any]] = (), slip_rate: float = 0.0,
               decoys: Sequence[str] = ()):
    self.plan = varied_expert_messages(task, seed)
    if slip_rate:
      self.plan = with_slips(self.plan, task, tools, seed, slip_rate, decoys)
    self.key = f'{task.task_id}/retry/{seed}'

  def __call__(self, messages: Sequence[Message]) -> Message:
    sent, failed, retry = _failed_calls(messages)
    if failed and not retry:
      rng = random.Random(f'{self.key}/{len(messages)}')
      last = next(m for m in reversed(messages) if m.role == 'assistant')  # a slip's retry is a slip too
      message = Message('assistant', rng.choice(RETRY), tool_calls=tuple(failed), weight=last.weight)
    elif sent < len(self.plan):
      message = self.plan[sent]
    else:
      return Message('assistant', 'Is there anything else I can do?')
    first = sum(len(m.tool_calls) for m in messages)
    calls = tuple(dataclasses.replace(call, id=f'functions.{call.name}:{first + k}')
                  for k, call in enumerate(message.tool_calls))
    return dataclasses.replace(message, tool_calls=calls)


class ExpertBackend:
  """The embedded default: the scripted expert, offline, deterministic per (task, seed). slip_rate > 0: it slips
  before that share of its calls and recovers (`with_slips`; `decoys`: tool names of other domains to slip to)."""

  def __init__(self, slip_rate: float = 0.0, decoys: Sequence[str] = ()):
    if not 0.0 <= slip_rate <= 1.0:
      raise ValueError(f'slip_rate must be in [0, 1], got {slip_rate}')
    self.slip_rate, self.decoys = slip_rate, tuple(decoys)
    self.name = f'expert(slip_rate={slip_rate})' if slip_rate else 'expert'

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    return VariedExpertAgent(task, seed, tools, self.slip_rate, self.decoys)


class OpenAIBackend:
  """An OpenAI-compatible chat endpoint at `base_url` (e.g. http://localhost:8000/v1) serving `model`, through the
  official client with `timeout_s` per request and `max_retries` retries of timeouts and 5xx (the client's own
  backoff); after those the error raises out of the agent. Sampling: `temperature`, `max_tokens` (None: the
  server's default) and the episode's seed, so a server that honours `seed` gives reproducible shards."""

  def __init__(self, base_url: str, model: str, api_key: str = 'none', temperature: float = 0.0,
               timeout_s: float = 60.0, max_retries: int = 2, max_tokens: int | None = None):
    if timeout_s <= 0 or max_retries < 0:
      raise ValueError(f'timeout_s must be > 0 and max_retries >= 0, got {timeout_s}, {max_retries}')
    self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
    self.model = model
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.name = f'openai:{model}@T={temperature}'

  def complete(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
               seed: int | None = None) -> Message:
    """One chat completion: the first choice's message (its tool calls with their arguments as the model wrote
    them: the environment checks them). Raises on a transport error, an error status or an answer without one."""
    optional = {'tools': list(tools) if tools else None, 'seed': seed, 'max_tokens': self.max_tokens}
    response = self.client.chat.completions.create(
        model=self.model, messages=[message_dict(m) for m in messages], temperature=self.temperature,
        **{key: value for key, value in optional.items() if value is not None})
    if not getattr(response, 'choices', None):
      raise ValueError(f'{self.model} answered without a choice: {str(response)[:200]}')
    return Message.from_dict(response.choices[0].message.model_dump())

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    del task  # the agent sees only what a deployed model sees: the history and the tool declarations
    return functools.partial(self.complete, tools=tools, seed=seed)


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled assistant turn: `text` (special tokens written out, what k2.gym.ToolEnv.step parses), the prompt's
  token ids, the sampled ids (ending with <|im_end|> unless finish_reason is 'length') and their log-probs. RL
  trains on these ids, never on a re-encoding of `text`."""
  text: str
  prompt_tokens: list[int]
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str


class ContextOverflow(ValueError):
  """The conversation no longer fits the model's positions (ends the episode, like any backend error)."""


class ModelBackend:
  """Our own model through the sampler: each conversation rendered with k2.chat (its tools declared, the generation
  prompt appended), continued by k2.sample.engine.rollout up to <|im_end|> or `max_new_tokens`. `complete_batch`
  samples many conversations in one continuous-batching call (k2.gym.run_episodes steps every live episode of an
  evaluation or an RL iteration together); `agent` serves one episode at a time (synthesis, k2.gym.run_episode)."""

  def __init__(self, model, tokenizer, *, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
               num_slots: int = 64, max_positions: int | None = None, name: str = 'model', mesh=None):
    chat.check_tokenizer(tokenizer)
    self.model, self.tokenizer, self.name, self.mesh = model, tokenizer, name, mesh
    self.temperature, self.top_p, self.max_new_tokens, self.num_slots = temperature, top_p, max_new_tokens, num_slots
    self.im_end = tokenizer.special_tokens[chat.template.IM_END]
    # max_positions may exceed the config's: RoPE has no parameters (a model pretrained shorter can be given more).
    self.max_positions = max_positions or model.config.rope.max_position_embeddings

  def complete_batch(self, conversations: Sequence[tuple[Sequence[Message], Sequence[Mapping[str, Any]]]],
                     seed: int) -> list[Completion | ContextOverflow]:
    """conversations: (history, tools) pairs. One Completion each, or a ContextOverflow for one whose prompt leaves
    no room to answer (returned, not raised, so the other conversations go on)."""
    prompts = [chat.render(history, self.tokenizer, tools=tools, add_generation_prompt=True).tokens
               for history, tools in conversations]
    return self.complete_tokens(prompts, [self.max_new_tokens] * len(prompts), seed)

  def complete_tokens(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                      seed: int) -> list[Completion | ContextOverflow]:
    """complete_batch on prompts already rendered (RL's multi-turn episodes extend their own token rows, never
    re-encoding what was sampled); budgets: the most tokens each may sample, cut to the positions left."""
    from k2 import sample  # noqa: PLC0415 (JAX and the model load only for this backend, not for scripted synthesis)
    out: list[Completion | ContextOverflow] = [
        ContextOverflow(f'the conversation is {len(p)} tokens; the model has {self.max_positions} positions')
        for p in prompts]
    live = [i for i, p in enumerate(prompts) if len(p) < self.max_positions]
    if live:
      budgets = [min(budgets[i], self.max_positions - len(prompts[i])) for i in live]
      # Padded to a power-of-two count with one-token dummies (budget 1), so that as episodes end the engine
      # compiles for a few batch sizes, not one per count.
      pad = min(self.num_slots, 1 << (len(live) - 1).bit_length()) - len(live)
      result = sample.engine.rollout(
          self.model, [list(prompts[i]) for i in live] + [[self.im_end]] * max(pad, 0), budgets + [1] * max(pad, 0),
          num_slots=self.num_slots, temperature=self.temperature, top_p=self.top_p, stop_tokens=[self.im_end],
          seed=seed, mesh=self.mesh)
      for j, i in enumerate(live):
        out[i] = Completion(chat.decode(result.tokens[j], self.tokenizer), list(prompts[i]), result.tokens[j],
                            result.logprobs[j], result.finish_reasons[j])
    return out

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    del task  # the model sees only what a deployed model sees

    def act(history: Sequence[Message]) -> str:
      turn = sum(message.role == 'assistant' for message in history)
      completion = self.complete_batch([(history, tools)], seed=seed * 1009 + turn)[0]
      if isinstance(completion, Exception):
        raise completion
      return completion.text
    return act

  def complete(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
               seed: int | None = None) -> Message:
    """One chat completion as a Message (its tool calls parsed; what the LLM judge and user talk through)."""
    completion = self.complete_batch([(messages, tools)], seed=seed or 0)[0]
    if isinstance(completion, Exception):
      raise completion
    parsed = chat.parse_tool_calls(completion.text)
    return Message('assistant', parsed.content, tool_calls=tuple(parsed.tool_calls))
