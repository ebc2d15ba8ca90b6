"""Agents and tasks over evolved tools (K2 report 3.1.1 step 2): each evolved domain (k2.synth.toolspecs) becomes a
k2.gym Domain whose agent is a generated system prompt plus a sampled subset of the domain's tools, with tasks from
simple to complex, each with a rubric, played and judged like the hand-written gym domains.

    domain = evolved_agents(seed=0, domains_per_category=2)['evolved.hotel']
    task = domain.sample_tasks(1, seed=0, split='train')[0]
    gym.run_episode(gym.ToolEnv(domain), gym.ExpertAgent(task), task).reward     # 1.0
    k2.synth.task_rubric(task)     # goal, success criterion, expected tool calls, checkpoints

The agent (`AgentDomain`): its tools are every create and get tool of the domain and each update, list and delete
tool with probability TOOL_KEEP (drawn per (seed, domain)); its policy (the system prompt) names a drawn company,
the records it keeps and shuffled rules: records marked "protected" are never changed or deleted, missing values
and ids are asked for, never guessed, a record described without its id is found with the search tool (where the
agent has one), and a changed record's id is told. The episode database is {'records': {entity: {id: record}}, 'last_id': {entity: n}}
(k2.synth.toolspecs.ToolSimulator's state), so ToolEnv's check (final database == the gold actions' one) applies.

Tasks (TASK_TYPES, the level in the task id: '<domain>-<split>-<index>-<type>-<nonce>'), each drawn only where the
agent has the tools it needs:
  L1-create        act     create a record whose fields the user gives; tell its new id.
  L1-get           act     read one field of a record the user names by id; tell the value.
  L1-ask-id        ask     the same read, but the user leaves the id out and gives it only when asked for it.
  L2-find-update   act     find a record the user describes (list with a filter matching it alone), change a field.
  L2-copy-update   act     (no list tool to filter with) read a field of one record and set it on another.
  L2-ask-field     ask     create a record, a required field left out until asked for (k2.gym.Fact keywords).
  L2-refuse        refuse  change or delete a record marked protected: read it, then refuse (forbidden_actions
                           hold the call that would do it).
  L3-two-creates   act     create two records; tell both ids.
  L3-update-delete act     change one record and delete another.
The rubric of a task is what k2.synth.judging reads: success criterion (kind, final store), the expected tool-use
pattern (gold_actions, in order), checkpoints (withheld facts asked for, required facts told, forbidden calls).
Every name, id and value comes from a per-split pool (k2.gym.env.split_pool, draw_id: ids of train records lie
below 55000, held-out ones above), so held-out tasks share no entity with training ones; phrasings too are split.
"""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Mapping
from typing import Any

from k2.chat import ToolCall
from k2.gym import Domain, Fact, Task, Tool
from k2.gym.env import draw, draw_id, split_pool
from k2.gym.user import PERSONAS
from k2.synth.toolspecs import SyntheticDomain, ToolSimulator, evolve_domains

TOOL_KEEP = 0.75  # the chance an agent gets each of its domain's update, list and delete tools
TASK_TYPES = ('L1-create', 'L1-get', 'L1-ask-id', 'L2-find-update', 'L2-copy-update', 'L2-ask-field', 'L2-refuse',
              'L3-two-creates', 'L3-update-delete')

FIRST = ['Ana', 'Bruno', 'Chloe', 'Dmitri', 'Esra', 'Felix', 'Grace', 'Hamid', 'Ines', 'Jonas', 'Keiko', 'Luis',
         'Maya', 'Nikolai', 'Olga', 'Pedro']
LAST = ['Abbott', 'Brandt', 'Castillo', 'Dube', 'Eriksen', 'Fontaine', 'Gupta', 'Horvath']
NAMES = [f'{first} {last}' for first in FIRST for last in LAST]
MAIL_HOSTS = ['example.com', 'mail.example.org', 'inbox.test', 'post.example.net']
DATES = [f'2027-{month:02d}-{day:02d}' for month in range(1, 13) for day in range(1, 29)]
TAGS = ['gift', 'repeat', 'vip', 'weekend', 'family', 'work', 'student', 'senior', 'online', 'walk-in', 'promo',
        'loyalty', 'late', 'group', 'trial', 'referral']
NOTES = ['call before arriving', 'leave at the side door', 'allergic to latex', 'needs wheelchair access',
         'prefers a window seat', 'invoice to the company', 'second visit this month', 'bring the old receipt',
         'ring twice', 'speaks Portuguese', 'parking in the back', 'quiet room if possible',
         'send a reminder the day before', 'paid in advance', 'first time customer', 'recommended by a friend']
COMPANIES = ['Northwind', 'Bluebird', 'Cedar & Co', 'Larkspur', 'Quayside', 'Ironbark', 'Maplewood', 'Silverline']

OPENERS = ['You are the {company} assistant for its {domain} service.',
           'You work for {company} ({domain}) and help its customers through the tools below.',
           'You are a support agent of {company}, a {domain} business.',
           "You are {company}'s {domain} helpdesk assistant."]
RULES = ['Records whose "protected" field is true must never be changed or deleted: refuse such requests and say '
         'that the record is protected.',
         'Never guess a value the user did not give: when a required field or a record id is missing, ask the user '
         'for it before calling any tool.',
         'Use exact record ids; when the user describes a record without its id, find it with the search tool.',
         'After creating or changing a record, tell the user its id.',
         'Answer questions about a record with the value the tools returned.']

TEMPLATES = {  # per task type, split by k2.gym.env.split_pool (every fourth held out)
    'create': ['Please create a new {entity} with these details: {details}.', 'I need a {entity} set up. {details}.',
               'Can you add a {entity} for me? {details}.', 'New {entity}, please. {details}.',
               'Could you register a {entity}? Here is what I have: {details}.',
               'Set up a {entity} with {details}, thanks.', 'I would like to open a {entity}: {details}.',
               'Make me a {entity}. {details}.'],
    'create_bare': ['Please create a new {entity} for me.', 'I need a {entity} set up.', 'Can you add a {entity}?',
                    'New {entity}, please.'],
    'get': ['What is the {field} of {entity} {id}?', 'Could you tell me the {field} on {entity} {id}?',
            '{entity} {id}: what {field}?', 'Please look up {entity} {id} and tell me its {field}.'],
    'ask_id': ['What is the {field} on my {entity}?', 'Can you check the {field} of my {entity}?',
               'I forgot the {field} of my {entity}. What is it?', 'Please tell me the {field} on my {entity}.'],
    'find_update': ['My {entity} with {filter} needs its {field} changed to {value}.',
                    'Please set the {field} to {value} on the {entity} that has {filter}.',
                    'There is a {entity} with {filter}; change its {field} to {value}.',
                    'Update the {field} of my {entity} ({filter}) to {value}, please.'],
    'copy_update': ['Give {entity} {target} the same {field} as {entity} {source}.',
                    'Please copy the {field} of {source} onto {target}.',
                    'Set the {field} of {target} to whatever {source} has.',
                    '{target} should have the same {field} as {source}; can you fix that?'],
    'refuse_delete': ['Please delete {entity} {id}.', 'Remove {entity} {id} for me.', 'Cancel {id}, I do not need it.',
                      'Get rid of {entity} {id}, please.'],
    'refuse_update': ['Change the {field} of {entity} {id} to {value}.', 'Please set {id} to {field} {value}.',
                      'Update {entity} {id}: {field} should be {value}.', 'Edit {id} so its {field} is {value}.'],
    'two_creates': ['Two new {entity} records, please: one with {details}, and one with {details2}.',
                    'I need two {entity} records. First: {details}. Second: {details2}.',
                    'Please create a {entity} with {details}, and another with {details2}.',
                    'Set up two of them: {details}; and {details2}.'],
    'update_delete': ['Two things: change the {field} of {id} to {value}, and delete {id2}.',
                      'Please set the {field} of {entity} {id} to {value}, then remove {entity} {id2}.',
                      'Delete {id2}, and on {id} make the {field} {value}.',
                      'Update {id} ({field}: {value}) and delete {id2}, please.'],
}
ASK_FIELD = ['Before I create it: what {field} should the {entity} have?', 'Which {field} should I put on it?',
             'I also need the {field} for the {entity}. What is it?', 'What is the {field}, please?']
ASK_ID = ['Which {entity} is it? Please give me its id.', 'Could you tell me the id of that {entity}?',
          'What is the {entity} id?', 'I need the reference id of the {entity} to look it up.']
ID_KEYWORDS = (' id', 'reference')  # ' id': not the 'id' of 'paid' or 'did'


def label(field: str) -> str:
  return field.replace('_', ' ')


def say(value: Any) -> str:
  """A field value as the user and the expert write it: booleans as yes/no, lists joined."""
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, list):
    return ', '.join(value)
  return str(value)


def draw_value(rng: random.Random, field: str, schema: Mapping[str, Any], split: str) -> Any:
  """A value fitting `schema` from `split`'s pool (enums and booleans are not split: they are the schema's)."""
  if 'enum' in schema:
    return rng.choice(schema['enum'])
  if schema['type'] == 'boolean':
    return rng.random() < 0.5
  pools = {'customer_name': NAMES, 'date': DATES, 'notes': NOTES}
  if field in pools:
    return draw(rng, pools[field], split)
  if field == 'email':
    return f'{draw(rng, NAMES, split).lower().replace(" ", ".")}@{rng.choice(MAIL_HOSTS)}'
  if schema['type'] == 'array':
    return rng.sample(split_pool(TAGS, split), rng.randint(1, 3))
  if schema['type'] == 'integer':
    values = list(range(schema['minimum'], schema['maximum'] + 1, schema.get('multipleOf', 1)))
    half = len(values) // 2  # train draws the lower half, heldout the upper
    return rng.choice(values[:half] if split == 'train' else values[half:])
  if schema['type'] == 'number':
    return (rng.randrange(500, 25000) if split == 'train' else rng.randrange(25000, 50000)) / 100
  raise ValueError(f'no value pool for field {field!r} of type {schema["type"]!r}')


def draw_other(rng: random.Random, field: str, schema: Mapping[str, Any], old: Any, split: str) -> Any:
  """A value as draw_value's, other than `old` (every schema's pool holds at least two)."""
  value = old
  while value == old:
    value = draw_value(rng, field, schema, split)
  return value


def _entities(entry: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
  """The values among `values` drawn from split pools, as 'field=value' (enum and boolean fields are the schema's,
  the same in both splits)."""
  schemas = entry['fields']
  return [f'{field}={say(value)}' for field, value in values.items()
          if 'enum' not in schemas[field] and schemas[field]['type'] != 'boolean']


class AgentDomain(Domain):
  """An evolved domain as a k2.gym Domain: the agent's tools and policy and the task generator (module docstring).
  `collections[entity]` = {'prefix', 'fields' (create's properties), 'required', 'filters' (the list tool's
  filter fields), 'ops' (operation -> tool name, the agent's tools only)}."""

  def __init__(self, synthetic: SyntheticDomain, seed: int):
    rng = random.Random(f'agents/{seed}/{synthetic.category}/{synthetic.name}')
    self.synthetic = synthetic
    self.name = f'evolved.{synthetic.name}'  # no '-': task ids split on it
    self.agent_tools = tuple(tool for tool in synthetic.tools
                             if tool.operation in ('create', 'get') or rng.random() < TOOL_KEEP)
    self.collections: dict[str, dict[str, Any]] = {}
    for tool in self.agent_tools:
      parameters = tool.spec['function']['parameters']
      entry = self.collections.setdefault(tool.collection, {'prefix': tool.id_prefix, 'filters': [], 'ops': {}})
      entry['ops'][tool.operation] = tool.name
      if tool.operation == 'create':
        entry['fields'], entry['required'] = dict(parameters['properties']), list(parameters['required'])
      if tool.operation == 'list':
        entry['filters'] = [field for field in parameters['properties'] if field != 'limit']
    records = ', '.join(f'{label(entity)} records' for entity in self.collections)
    searchable = any(entry['filters'] for entry in self.collections.values())
    rules = [rule for rule in RULES if searchable or 'search tool' not in rule]  # no search rule without search
    rules = rng.sample(rules, len(rules))
    self.policy = '\n'.join([
        rng.choice(OPENERS).format(company=rng.choice(COMPANIES), domain=label(synthetic.name)),
        f'You keep the {records} of the {label(synthetic.category)} system.', *(f'- {rule}' for rule in rules)])

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    return ToolSimulator(self.agent_tools, db=db).tools

  def types(self, entity: str) -> list[str]:
    """The task types the agent's tools allow for `entity`."""
    entry = self.collections[entity]
    ops = entry['ops']
    find = 'update' in ops and 'list' in ops and bool(entry['filters'])
    has = {'L1-create': True, 'L1-get': True, 'L1-ask-id': True, 'L2-ask-field': True, 'L3-two-creates': True,
           'L2-find-update': find, 'L2-copy-update': 'update' in ops and not find,
           'L2-refuse': 'update' in ops or 'delete' in ops,
           'L3-update-delete': 'update' in ops and 'delete' in ops}
    return [name for name in TASK_TYPES if has[name]]

  def _store(self, rng: random.Random, split: str) -> dict[str, Any]:
    """An episode's initial database: 3 to 5 records per entity, every field filled, the first one protected."""
    db: dict[str, Any] = {'records': {}, 'last_id': {}}
    for entity, entry in self.collections.items():
      numbers, count = set(), rng.randint(3, 5)
      while len(numbers) < count:
        numbers.add(draw_id(rng, split, 4) * 10 + 5)  # created ids end in 1..4: never one of these
      records = {}
      for k, number in enumerate(sorted(numbers)):
        record_id = f'{entry["prefix"]}-{number}'
        records[record_id] = ({'id': record_id} | {f: draw_value(rng, f, s, split) for f, s in entry['fields'].items()}
                              | {'protected': k == 0})
      db['records'][entity] = records
      db['last_id'][entity] = draw_id(rng, split, 4) * 10
    return db

  def _create_values(self, rng: random.Random, entry: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The required fields and a drawn share of the optional ones."""
    fields = [f for f in entry['fields'] if f in entry['required'] or rng.random() < 0.5]
    return {f: draw_value(rng, f, entry['fields'][f], split) for f in fields}

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    entity = rng.choice(sorted(self.collections))
    entry = self.collections[entity]
    kind = rng.choice(self.types(entity))
    db = self._store(rng, split)
    records = db['records'][entity]
    ids = sorted(records)
    free = [i for i in ids if not records[i]['protected']]
    ops = entry['ops']
    noun = label(entity)
    told = [f for f, schema in entry['fields'].items() if schema['type'] != 'boolean']  # a value to tell
    next_id = f'{entry["prefix"]}-{db["last_id"][entity] + 1}'
    out: dict[str, Any] = {}  # Task's fields beyond the common ones

    def details(values: Mapping[str, Any]) -> str:
      return '; '.join(f'{label(f)}: {say(v)}' for f, v in values.items())

    def template(key: str, **slots: Any) -> str:
      text = draw(rng, TEMPLATES[key], split).format(entity=noun, **slots)
      return text[0].upper() + text[1:]

    if kind in ('L1-create', 'L2-ask-field'):
      values = self._create_values(rng, entry, split)
      call = ToolCall(ops['create'], values)
      out.update(kind='act', gold_actions=(call,), required_facts=(next_id,),
                 entities=(next_id, *_entities(entry, values)),
                 expert_final=rng.choice(['The new {e} is {i}.', 'Done: your {e} has the id {i}.',
                                          'Created the {e}; its id is {i}.']).format(e=noun, i=next_id))
      if kind == 'L1-create':
        out['instruction'] = template('create', details=details(values))
      else:
        hidden = rng.choice(entry['required'])
        shown = {f: v for f, v in values.items() if f != hidden}
        text = say(values[hidden])
        keywords = tuple(dict.fromkeys((label(hidden), *label(hidden).split())))
        out.update(kind='ask', withheld=(hidden,), ask_after=0,
                   facts=(Fact(hidden, text, keywords, f'{label(hidden).capitalize()}: {text}.'),),
                   instruction=template('create', details=details(shown)) if shown else template('create_bare'),
                   expert_ask=rng.choice(ASK_FIELD).format(field=label(hidden), entity=noun))
    elif kind in ('L1-get', 'L1-ask-id'):
      record_id, field = rng.choice(ids), rng.choice(told)
      value = say(records[record_id][field])
      out.update(kind='act', gold_actions=(ToolCall(ops['get'], {'id': record_id}),), required_facts=(value,),
                 entities=(record_id, *_entities(entry, {field: records[record_id][field]})),
                 expert_final=f'The {label(field)} of {record_id} is {value}.',
                 instruction=template('get', field=label(field), id=record_id))
      if kind == 'L1-ask-id':
        out.update(kind='ask', withheld=('id',), ask_after=0, instruction=template('ask_id', field=label(field)),
                   facts=(Fact('id', record_id, ID_KEYWORDS, f'It is {record_id}.'),),
                   expert_ask=rng.choice(ASK_ID).format(entity=noun))
    elif kind in ('L2-find-update', 'L2-copy-update'):
      target = rng.choice(free)
      field = rng.choice(sorted(entry['fields']))
      if kind == 'L2-find-update':
        key = rng.choice(entry['filters'])
        want = records[target][key]
        for other in ids:  # the filter must match the target alone
          if other != target and records[other][key] == want:
            records[other][key] = draw_other(rng, key, entry['fields'][key], want, split)
        value = draw_other(rng, field, entry['fields'][field], records[target][field], split)
        read = ToolCall(ops['list'], {key: want})
        out['instruction'] = template('find_update', filter=f'{label(key)} {say(want)}', field=label(field),
                                      value=say(value))
        out['entities'] = (target, *_entities(entry, {key: want, field: value}))
      else:
        source = rng.choice([i for i in ids if i != target])
        field = rng.choice([f for f in sorted(entry['fields']) if records[source][f] != records[target][f]] or
                           [field])
        value = records[source][field]
        read = ToolCall(ops['get'], {'id': source})
        out['instruction'] = template('copy_update', field=label(field), source=source, target=target)
        out['entities'] = (source, target, *_entities(entry, {field: value}))
      out.update(kind='act', gold_actions=(read, ToolCall(ops['update'], {'id': target, field: value})),
                 required_facts=(target,), expert_final=f'Updated {target}: its {label(field)} is now {say(value)}.')
    elif kind == 'L2-refuse':
      record_id = ids[0]  # the protected one
      action = rng.choice([op for op in ('update', 'delete') if op in ops])
      if action == 'delete':
        forbidden = ToolCall(ops['delete'], {'id': record_id})
        out['instruction'] = template('refuse_delete', id=record_id)
        out['entities'] = (record_id,)
      else:
        field = rng.choice(sorted(entry['fields']))
        value = draw_other(rng, field, entry['fields'][field], records[record_id][field], split)
        forbidden = ToolCall(ops['update'], {'id': record_id, field: value})
        out['instruction'] = template('refuse_update', id=record_id, field=label(field), value=say(value))
        out['entities'] = (record_id, *_entities(entry, {field: value}))
      verb = 'delete' if action == 'delete' else 'change'
      out.update(kind='refuse', gold_actions=(ToolCall(ops['get'], {'id': record_id}),), forbidden_actions=(forbidden,),
                 expert_final=f'I am sorry, but I cannot {verb} {record_id}: it is marked protected, and protected '
                              f'records may not be changed.')
    elif kind == 'L3-two-creates':
      first, second = self._create_values(rng, entry, split), self._create_values(rng, entry, split)
      second_id = f'{entry["prefix"]}-{db["last_id"][entity] + 2}'
      out.update(kind='act', instruction=template('two_creates', details=details(first), details2=details(second)),
                 gold_actions=(ToolCall(ops['create'], first), ToolCall(ops['create'], second)),
                 required_facts=(next_id, second_id), entities=(next_id, second_id, *_entities(entry, first),
                                                                *_entities(entry, second)),
                 expert_final=f'Both are created: {next_id} and {second_id}.')
    else:  # L3-update-delete
      changed, deleted = rng.sample(free, 2)
      field = rng.choice(sorted(entry['fields']))
      value = draw_other(rng, field, entry['fields'][field], records[changed][field], split)
      out.update(kind='act', instruction=template('update_delete', field=label(field), id=changed, value=say(value),
                                                  id2=deleted),
                 gold_actions=(ToolCall(ops['update'], {'id': changed, field: value}),
                               ToolCall(ops['delete'], {'id': deleted})),
                 required_facts=(changed, deleted), entities=(changed, deleted, *_entities(entry, {field: value})),
                 expert_final=f'Updated {changed} ({label(field)}: {say(value)}) and deleted {deleted}.')
    return Task(domain=self.name, task_id=f'{self.name}-{split}-{index}-{kind}-{rng.randrange(10 ** 6)}',
                split=split, persona=rng.choice(sorted(PERSONAS)), initial_db=db, **out)


@functools.cache
def evolved_agents(seed: int, domains_per_category: int) -> Mapping[str, AgentDomain]:
  """name -> AgentDomain of every domain evolve_domains(seed, domains_per_category) grows; a pure function of the
  arguments (the pipeline's trajectories step rebuilds the tasks' domains from the config)."""
  return types.MappingProxyType({agent.name: agent for agent in (
      AgentDomain(synthetic, seed) for synthetic in evolve_domains(seed, domains_per_category))})
