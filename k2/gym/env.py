"""The Gym-like protocol: a domain (database, tools, policy, tasks), an episode over it, and its verifiable reward.

    env = ToolEnv(domains.get('retail'))
    messages = env.reset(task, seed=0)            # [system: the domain's policy, user: the first request]
    result = env.step(assistant_message)          # Message, or the raw output text (parsed with k2.chat)
    result.messages, result.reward, result.done, result.info

An assistant message with tool calls is run against the episode's database (each call answered by a tool
message); one without calls goes to the simulated user (k2.gym.user), whose reply comes back. Nothing the agent
writes makes `step` raise: unparsable calls, unknown tools and arguments that fail the tool's JSON schema come back
as error results and are counted in `info`; the user's turns and the agent's turns are both capped. At the end
`info` also holds success, state_match, facts_told and gold_calls_matched (of gold_calls: argument exact match).
Controlled failures: with `failure_rate` > 0 a seeded share of tool calls answers TRANSIENT_ERROR without running
(the database is untouched; counted in info['transient_errors'], not as tool errors or as calls made), so an agent
has to retry them; the draws are a pure function of (task, seed).

Success (tau-bench's rule, checked on state, not on the words): the final database equals the one the task's gold
actions produce, every required fact was told to the user in an assistant message, on an 'ask' task the user was
asked for (and revealed) the facts the request left out before anything changed the database, and on a 'refuse'
task the agent said it would not do it.
The reward is 1.0 on success and 0.0 otherwise, given once, at the end of the episode.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema

from k2.chat import Message, ToolCall, declaration, parse_tool_calls, run_call

TRANSIENT_ERROR = 'error: service unavailable, retry'  # a controlled failure's result (ToolEnv.failure_rate)
KINDS = ('act', 'ask', 'refuse')  # do it; ask the user for what the request left out, then do it; refuse it
SPLITS = ('train', 'heldout')


@dataclasses.dataclass(frozen=True)
class Tool:
  """A function over a domain's database and its declaration (k2.chat's OpenAI function spec), whose
  'parameters' JSON schema every call's arguments are validated against before the function runs."""
  fn: Callable[..., Any]
  spec: Mapping[str, Any]

  @property
  def name(self) -> str:
    return self.spec['function']['name']


def make_tool(fn: Callable[..., Any], **properties: Mapping[str, Any]) -> Tool:
  """k2.chat.declaration(fn), with extra JSON-schema keywords per parameter (enum, description, minimum, items)
  and no parameters beyond the signature's."""
  spec = declaration(fn)
  parameters = spec['function']['parameters']
  for name, extra in properties.items():
    if name not in parameters['properties']:
      raise ValueError(f'{fn.__name__} has no parameter {name!r}')
    parameters['properties'][name].update(extra)
  parameters['additionalProperties'] = False
  return Tool(fn=fn, spec=spec)


@dataclasses.dataclass(frozen=True)
class Fact:
  """Something the simulated user knows: revealed (as `reply`) only when an assistant message mentions one of
  `keywords` (lower case)."""
  name: str
  value: str
  keywords: tuple[str, ...]
  reply: str


@dataclasses.dataclass(frozen=True)
class Task:
  """One episode's content. `instruction` is the user's first message (it leaves out the facts named in
  `withheld`); `facts` is what the user can tell when asked; `gold_actions` are the tool calls that solve it (reads
  included); `required_facts` must appear in what the agent tells the user. `expert_ask`, `expert_final` are the
  scripted expert's lines (question for the withheld facts, asked after the first `ask_after` gold actions;
  closing message or refusal). On a 'refuse' task, `forbidden_actions` are the calls that would carry out the
  request (planted bad trajectories, negative examples). `entities` lists the
  names, ids and values drawn for this task (the train/heldout pools are disjoint in them)."""
  domain: str
  task_id: str
  split: str
  kind: str
  persona: str
  instruction: str
  initial_db: Mapping[str, Any]
  gold_actions: tuple[ToolCall, ...]
  facts: tuple[Fact, ...] = ()
  withheld: tuple[str, ...] = ()
  required_facts: tuple[str, ...] = ()
  expert_ask: str = ''
  ask_after: int = 0
  forbidden_actions: tuple[ToolCall, ...] = ()
  expert_final: str = ''
  entities: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown task kind {self.kind!r}; known: {KINDS}')
    if self.split not in SPLITS:
      raise ValueError(f'unknown split {self.split!r}; known: {SPLITS}')
    missing = set(self.withheld) - {fact.name for fact in self.facts}
    if missing:
      raise ValueError(f'withheld facts {sorted(missing)} are not among the user facts')

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (for task files and trajectory shards); `Task.from_dict` reads it back."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'Task':
    fields = dict(data)
    for name in ('gold_actions', 'forbidden_actions'):
      fields[name] = tuple(ToolCall(**call) for call in fields.get(name, ()))
    fields['facts'] = tuple(Fact(**dict(fact, keywords=tuple(fact['keywords']))) for fact in fields.get('facts', ()))
    for name in ('withheld', 'required_facts', 'entities'):
      fields[name] = tuple(fields.get(name, ()))
    return cls(**fields)


class Domain:
  """An offline tau-bench-style domain. Subclasses set `name` and `policy` and define `tools(db)` (name -> Tool,
  functions bound to that database) and `sample_task(rng, split, index)`."""
  name: str = ''
  policy: str = ''

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    raise NotImplementedError

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    raise NotImplementedError

  def sample_tasks(self, n: int, seed: int, split: str = 'train') -> list[Task]:
    """n tasks drawn from `split`'s entity and phrasing pools; the same (n, seed, split) gives the same tasks."""
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; known: {SPLITS}')
    rng = random.Random(f'{self.name}/{split}/{seed}')  # str seeds hash the same in every process
    return [self.sample_task(rng, split, index) for index in range(n)]

  def tool_specs(self) -> list[dict[str, Any]]:
    """The declarations to render (k2.chat.render(..., tools=...)); they do not depend on the database."""
    return [dict(tool.spec) for tool in self.tools({}).values()]

  def system_prompt(self) -> str:
    return self.policy.strip()


# --- drawing entities: disjoint pools per split --------------------------------------------------------------------

def split_pool(pool: Sequence[Any], split: str) -> list[Any]:
  """Every fourth item of `pool` is held out, the rest is for training: disjoint by construction, so a held-out
  task's names, products and phrasings were never seen in training data."""
  return [item for i, item in enumerate(pool) if (i % 4 == 3) == (split == 'heldout')]


def draw(rng: random.Random, pool: Sequence[Any], split: str) -> Any:
  return rng.choice(split_pool(pool, split))


def draw_id(rng: random.Random, split: str, digits: int = 5) -> int:
  """A number of `digits` digits: one that is 3 modulo 4 for 'heldout', any other for 'train'. Disjoint values
  spread over the same range, so held-out numbers are unseen but written with the same digits as training ones."""
  low, high = 10 ** (digits - 1), 10 ** digits
  n = 4 * rng.randrange(low // 4, high // 4) + (3 if split == 'heldout' else rng.randrange(3))
  return n if n >= low else n + 4


# Training tasks take half their names from an unbounded space of invented ones, shaped like the pool's (case,
# words, separators): with a few dozen real names a model can learn them by heart and still fail to copy an unseen
# one from the conversation; invented names leave copying as the only way to get them right.
_SYLLABLES = ('ba', 'ko', 'ri', 'len', 'mar', 'tis', 'su', 'vel', 'da', 'no', 'pe', 'lu', 'ka', 'ran', 'mi', 'sol',
              'te', 'vo', 'zi', 'har', 'ne', 'dor', 'fi', 'ga', 'jo', 'ul', 'wen', 'an', 'el', 'or', 'qui', 'bes')


# Words the simulated users listen for (Fact.keywords): an invented name never contains one.
_AVOID = re.compile('date|time|file|when|why|which|start|reason|mail|order|people|person|ways|name|day|account')


def _invent_like(rng: random.Random, template: str) -> str:
  def word(match: re.Match) -> str:
    while _AVOID.search(w := ''.join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))):
      pass
    return w.capitalize() if match.group()[0].isupper() else w
  return re.sub(r'[A-Za-z]+', word, template)


def sample_names(rng: random.Random, pool: Sequence[str], split: str, k: int, invented: float = 0.5) -> list[str]:
  """k distinct names for `split`: held-out ones from the pool's held-out items; training ones from its training
  items or, each with probability `invented`, invented in the same shape (never a held-out item)."""
  names = rng.sample(split_pool(pool, split), k)
  if split != 'train':
    return names
  taken = {n.lower() for n in pool}
  for i, name in enumerate(names):
    if rng.random() < invented:
      while (new := _invent_like(rng, name)).lower() in taken:
        pass
      taken.add(new.lower())
      names[i] = new
  return names


def draw_name(rng: random.Random, pool: Sequence[str], split: str) -> str:
  return sample_names(rng, pool, split, 1)[0]


# --- facts told, refusals, validation ----------------------------------------------------------------------------

_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')
_REFUSAL = re.compile(r"\b(can't|cannot|can not|unable to|not able to|not allowed|won't be able|am not permitted|"
                      r"against (?:our |the )?policy|not permitted)\b", re.IGNORECASE)


def normalize(text: str) -> str:
  """Lower case, thousands separators and currency signs dropped, whitespace collapsed."""
  text = re.sub(r'(?<=\d),(?=\d{3})', '', text.lower()).replace('$', '')
  return ' '.join(text.split())


def fact_told(fact: str, text: str) -> bool:
  """A number is told when the text holds a number of the same value (1200 == 1,200.00); anything else when its
  normalized form is a substring of the normalized text."""
  fact_n, text_n = normalize(fact), normalize(text)
  if _NUMBER.fullmatch(fact_n):
    return any(abs(float(number) - float(fact_n)) < 1e-9 for number in _NUMBER.findall(text_n))
  return fact_n in text_n


def is_refusal(text: str) -> bool:
  return bool(_REFUSAL.search(text))


def validate(tool: Tool, arguments: Any) -> str | None:
  """None when `arguments` fit the tool's parameter schema, else the first error as one line."""
  error = jsonschema.exceptions.best_match(
      jsonschema.Draft202012Validator(tool.spec['function']['parameters']).iter_errors(arguments))
  if error is None:
    return None
  where = '/'.join(str(p) for p in error.absolute_path)
  return f'{where}: {error.message}' if where else error.message


def _arguments(call: ToolCall) -> Any:
  try:
    return json.loads(call.arguments) if isinstance(call.arguments, str) else dict(call.arguments)
  except ValueError:
    return call.arguments


def gold_calls_matched(gold: Sequence[ToolCall], calls: Sequence[ToolCall]) -> int:
  """How many gold actions the agent made exactly (same tool, equal arguments), each agent call used once."""
  left = [(call.name, _arguments(call)) for call in calls]
  matched = 0
  for call in gold:
    key = (call.name, _arguments(call))
    if key in left:
      left.remove(key)
      matched += 1
  return matched


def execute(call: ToolCall, tools: Mapping[str, Tool]) -> tuple[str, str | None]:
  """Runs one call; (result text, error kind or None). Never raises: an unknown tool, arguments that are not a JSON
  object or fail the schema, or a function that raises give an 'error: ...' result."""
  tool = tools.get(call.name)
  if tool is None:
    return f'error: unknown tool {call.name!r}; available: {", ".join(sorted(tools))}', 'unknown_tool'
  arguments = call.arguments
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except ValueError as e:
      return f'error: arguments are not JSON: {e}', 'invalid_arguments'
  problem = validate(tool, arguments)
  if problem is not None:
    return f'error: invalid arguments for {call.name}: {problem}', 'invalid_arguments'
  result = run_call(ToolCall(call.name, arguments, call.id), {call.name: tool.fn})
  return result, ('tool_error' if result.startswith('error:') else None)


def gold_state(domain: Domain, task: Task) -> dict[str, Any]:
  """The database after the task's gold actions; raises if one of them fails (a bug in the task generator)."""
  db = copy.deepcopy(dict(task.initial_db))
  tools = domain.tools(db)
  for call in task.gold_actions:
    result, error = execute(call, tools)
    if error is not None:
      raise ValueError(f'gold action {call} of {task.task_id} failed: {result}')
  return db


# --- the environment ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepResult:
  """messages: what the environment answers (tool results, a parse error note, or the user's reply);
  reward: the task's reward on the step that ends the episode, else 0.0; info: the episode's counters."""
  messages: list[Message]
  reward: float
  done: bool
  info: dict[str, Any]


class ToolEnv:
  """One episode at a time over one domain (see the module docstring). `user_factory(task, seed)` makes the
  simulated user (default: k2.gym.user.ScriptedUser); `max_user_turns` caps the user's replies whatever the
  simulator does; `max_assistant_turns` caps the agent's messages (a model that only calls tools); `failure_rate`
  is the share of tool calls that fail transiently (see the module docstring)."""

  def __init__(self, domain: Domain, user_factory: Callable[[Task, int], Any] | None = None,
               max_user_turns: int = 8, max_assistant_turns: int = 24, failure_rate: float = 0.0):
    from k2.gym.user import ScriptedUser  # user.py imports this module's helpers
    if not 0.0 <= failure_rate < 1.0:
      raise ValueError(f'failure_rate must be in [0, 1), got {failure_rate}')
    self.failure_rate = failure_rate
    self.domain = domain
    self.user_factory = user_factory or ScriptedUser
    self.max_user_turns = max_user_turns
    self.max_assistant_turns = max_assistant_turns
    self.task: Task | None = None

  @property
  def tool_specs(self) -> list[dict[str, Any]]:
    return self.domain.tool_specs()

  def reset(self, task: Task, seed: int = 0) -> list[Message]:
    """Starts an episode of `task`: [system (policy), user (first request)]. The history is `self.messages`."""
    self.task = task
    self.db = copy.deepcopy(dict(task.initial_db))
    self.tools = self.domain.tools(self.db)
    self.gold_db = gold_state(self.domain, task)
    self.user = self.user_factory(task, seed)
    self.failures = random.Random(f'{task.task_id}/failures/{seed}')
    self.done = False
    self.reward = 0.0
    self.info: dict[str, Any] = dict(
        assistant_turns=0, user_turns=0, tool_calls=0, tool_errors=0, unknown_tools=0, invalid_arguments=0,
        transient_errors=0, malformed_outputs=0, parse_errors=[], revealed=[], refused=False, acted_before_asking=False,
        truncated=False)
    self.calls: list[ToolCall] = []  # every call that ran (not failed transiently), for argument exact match
    self.messages = [Message('system', self.domain.system_prompt()), Message('user', self.user.first_message())]
    return list(self.messages)

  def _told(self) -> list[str]:
    said = ' '.join(m.content for m in self.messages if m.role == 'assistant')
    return [fact for fact in self.task.required_facts if fact_told(fact, said)]

  def goal_met(self) -> bool:
    """What the user could check for themselves: the database is as the gold actions leave it, the required facts
    were told, and what was withheld was asked for. A refusal never meets the goal."""
    task = self.task
    return (task.kind != 'refuse' and self.db == self.gold_db and len(self._told()) == len(task.required_facts)
            and set(task.withheld) <= set(self.info['revealed']) and not self.info['acted_before_asking'])

  def success(self) -> bool:
    if self.task.kind == 'refuse':
      return (self.db == self.gold_db and self.info['refused']
              and len(self._told()) == len(self.task.required_facts))
    return self.goal_met()

  def abort(self, error: str, key: str = 'agent_error') -> StepResult:
    """Ends the episode now, scored as it stands, with `error` in info[key]: 'agent_error' when the agent's backend
    failed (a timeout, a 5xx), 'user_error' when the user simulator's did."""
    self.info[key] = error
    return self._finish([], truncated=True)

  def _finish(self, messages: list[Message], truncated: bool = False) -> StepResult:
    self.done = True
    self.info['truncated'] = truncated
    self.info['state_match'] = self.db == self.gold_db
    self.info['facts_told'] = self._told()
    self.info['success'] = self.success()
    self.info['gold_calls'] = len(self.task.gold_actions)
    self.info['gold_calls_matched'] = gold_calls_matched(self.task.gold_actions, self.calls)
    self.reward = float(self.info['success'])
    return StepResult(messages, self.reward, True, dict(self.info))

  def step(self, assistant: Message | str) -> StepResult:
    """One agent turn. `assistant`: a Message, or the model's raw output text (special tokens written out)."""
    if self.task is None:
      raise RuntimeError('call reset(task) before step')
    if self.done:
      return StepResult([], 0.0, True, dict(self.info))
    parse_errors: list[str] = []
    if isinstance(assistant, str):
      parsed = parse_tool_calls(assistant)
      assistant, parse_errors = Message('assistant', parsed.content, tool_calls=parsed.tool_calls), parsed.errors
    elif not isinstance(assistant, Message) or assistant.role != 'assistant':
      assistant, parse_errors = Message('assistant', str(getattr(assistant, 'content', assistant))), ['not a message']
    self.messages.append(assistant)
    self.info['assistant_turns'] += 1
    if parse_errors:
      self.info['malformed_outputs'] += 1
      self.info['parse_errors'] = self.info['parse_errors'] + parse_errors  # one line each; transcripts show them
    if is_refusal(assistant.content):
      self.info['refused'] = True
    out: list[Message] = []
    if assistant.tool_calls:
      # An agent that changes the database before the user told what was left out has guessed it.
      guessing = not set(self.task.withheld) <= set(self.info['revealed'])
      before = copy.deepcopy(self.db) if guessing else None
      for call in assistant.tool_calls:
        self.info['tool_calls'] += 1
        if self.failure_rate and self.failures.random() < self.failure_rate:
          self.info['transient_errors'] += 1
          out.append(Message('tool', TRANSIENT_ERROR, tool_call_id=call.id))
          continue
        self.calls.append(call)
        result, error = execute(call, self.tools)
        if error is not None:
          self.info['tool_errors'] += 1
          if error != 'tool_error':
            self.info[{'unknown_tool': 'unknown_tools', 'invalid_arguments': 'invalid_arguments'}[error]] += 1
        out.append(Message('tool', result, tool_call_id=call.id))
      if guessing and self.db != before:
        self.info['acted_before_asking'] = True
    elif parse_errors:
      # Nothing to answer with a tool message: say what could not be read, and let the agent try again.
      out.append(Message('system', 'error: the tool calls could not be parsed: ' + '; '.join(parse_errors)))
    else:
      try:
        reply = self.user.respond(assistant.content, self.goal_met())
      except Exception as e:  # noqa: BLE001 (an LLM user's failing backend must not stop a run either)
        return self.abort(f'{type(e).__name__}: {e}', key='user_error')
      self.info['user_turns'] += 1
      self.info['revealed'] = sorted(set(self.info['revealed']) | set(reply.revealed))
      out.append(Message('user', reply.content))
      if reply.done or self.info['user_turns'] >= self.max_user_turns:
        self.messages += out
        return self._finish(out, truncated=not reply.done)
    self.messages += out
    if self.info['assistant_turns'] >= self.max_assistant_turns:
      return self._finish(out, truncated=True)
    return StepResult(out, 0.0, False, dict(self.info))


Agent = Callable[[Sequence[Message]], Message | str]


@dataclasses.dataclass(frozen=True)
class Episode:
  messages: list[Message]
  reward: float
  info: dict[str, Any]


def run_episode(env: ToolEnv, agent: Agent, task: Task, seed: int = 0) -> Episode:
  """Plays `agent` (history -> next assistant message or raw text) against `env` on `task` until it ends. An agent
  that raises ends the episode (scored as it stands) with the error in info['agent_error']."""
  env.reset(task, seed)
  while True:
    try:
      output = agent(list(env.messages))
    except Exception as e:  # noqa: BLE001 (a failing backend must not stop a synthesis or evaluation run)
      result = env.abort(f'{type(e).__name__}: {e}')
      return Episode(list(env.messages), result.reward, result.info)
    result = env.step(output)
    if result.done:
      return Episode(list(env.messages), result.reward, result.info)
