"""Tool specs (K2 report 3.1.1 step 1): real ones loaded from JSON files, synthetic ones grown by hierarchical domain
evolution, and a simulator that runs the synthetic ones over a per-episode store.

    specs = load_tool_specs('mcp_tools.json')          # OpenAI function specs, each schema checked
    domains = evolve_domains(seed=0)                   # category -> domain -> tools, the same for the same seed
    simulator = ToolSimulator(domains[0].tools, seed=3, failure_rate=0.1)
    simulator(ToolCall('add_booking', {'guest_name': 'Ana', 'nights': 2}))   # (result text, error kind or None)

Loading accepts a list of OpenAI function specs ({'type': 'function', 'function': {name, description, parameters}}
or the bare {name, description, parameters}) or an MCP `tools/list` result ({'tools': [{name, description,
inputSchema}]}); every schema is checked with jsonschema against its own draft, and a bad file is a one-line
ValueError naming the file and the tool.

Evolution walks a small taxonomy: each category grows `domains_per_category` domains, each domain one or two
entities (what its records are), and each entity a set of tools over it: always create and get, and by draw
update, list and delete, named with drawn verbs (add_booking, fetch_booking, modify_booking, search_bookings...).
An entity's fields are drawn from a pool covering the JSON-schema shapes models meet (strings with patterns,
integers and numbers with bounds, enums narrowed per domain, booleans, arrays), with a drawn required subset.

The simulator keeps one dict store per episode that create/get/update/list/delete act on consistently (a created
id can be read, changed, listed and deleted, then is not found), answers unknown ids with a not-found error,
rejects arguments that fail the schema (k2.gym.execute), and fails a seeded share of calls with
k2.gym.TRANSIENT_ERROR without touching the store (controlled failures: an agent has to retry).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from k2.chat import ToolCall
from k2.gym import TRANSIENT_ERROR, Tool, execute

_NAME = re.compile(r'^[A-Za-z0-9_-]{1,64}$')  # what OpenAI-style APIs accept as a function name


def _check_tool(item: Any) -> dict[str, Any]:
  """One entry of a spec file, in any of the accepted shapes, as an OpenAI function spec; ValueError if bad."""
  if not isinstance(item, Mapping):
    raise ValueError(f'a tool must be a JSON object, got {type(item).__name__}')
  if item.get('type', 'function') != 'function':
    raise ValueError(f'unknown tool type {item["type"]!r} (only "function")')
  function = item.get('function', item)
  if not isinstance(function, Mapping):
    raise ValueError('"function" must be a JSON object')
  name, description = function.get('name'), function.get('description', '')
  schema = function.get('parameters', function.get('inputSchema', {'type': 'object', 'properties': {}}))
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError('a name of 1 to 64 letters, digits, _ or - is required')
  if not isinstance(description, str):
    raise ValueError('description must be a string')
  if not isinstance(schema, Mapping) or schema.get('type') != 'object':
    raise ValueError('parameters must be a JSON schema of type "object"')
  try:
    jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
  except jsonschema.SchemaError as e:
    raise ValueError(f'invalid parameters schema: {e.message}') from None
  return {'type': 'function', 'function': {'name': name, 'description': description, 'parameters': dict(schema)}}


def load_tool_specs(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The tools of a JSON spec file (see the module docstring) as OpenAI function specs, in file order."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise ValueError(f'{path}: cannot read: {e.strerror}') from None
  except ValueError as e:
    raise ValueError(f'{path}: not JSON: {e}') from None
  items = data.get('tools') if isinstance(data, Mapping) else data
  if not isinstance(items, list):
    raise ValueError(f'{path}: expected a list of OpenAI function specs or an MCP tools/list result {{"tools": [...]}}')
  specs: dict[str, dict[str, Any]] = {}
  for index, item in enumerate(items):
    try:
      spec = _check_tool(item)
    except ValueError as e:
      function = item.get('function', item) if isinstance(item, Mapping) else None
      name = function.get('name') if isinstance(function, Mapping) else None
      raise ValueError(f'{path}: tool {name if isinstance(name, str) else f"#{index}"!r}: {e}') from None
    name = spec['function']['name']
    if name in specs:
      raise ValueError(f'{path}: tool {name!r}: declared twice')
    specs[name] = spec
  return list(specs.values())


# --- synthetic tools: hierarchical domain evolution --------------------------------------------------------------

# category -> domain -> the entities its tools keep records of
TAXONOMY = {
    'commerce': {'bookstore': ('book_order', 'gift_card'), 'pharmacy': ('prescription', 'refill'),
                 'florist': ('bouquet', 'delivery'), 'grocery': ('basket', 'substitution')},
    'travel': {'hotel': ('booking', 'room_service'), 'car_rental': ('reservation', 'vehicle'),
               'airline': ('ticket', 'baggage_claim'), 'tours': ('excursion', 'guide')},
    'health': {'clinic': ('appointment', 'referral'), 'fitness': ('membership', 'class_booking'),
               'dental': ('checkup', 'treatment_plan'), 'pet_care': ('vet_visit', 'vaccination')},
    'education': {'library': ('loan', 'hold'), 'school': ('enrollment', 'absence_note'),
                  'tutoring': ('session', 'homework'), 'language_lab': ('lesson', 'placement_test')},
    'home': {'utilities': ('meter_reading', 'outage_report'), 'moving': ('quote', 'truck'),
             'cleaning': ('visit', 'supply_order'), 'repairs': ('work_order', 'estimate')},
    'finance': {'banking': ('transfer', 'payee'), 'insurance': ('claim', 'policy_change'),
                'payroll': ('payslip', 'expense_report'), 'budgeting': ('envelope', 'savings_goal')},
}
# field -> its JSON schema; an entity draws a few, and enums are narrowed per domain
FIELDS = {
    'customer_name': {'type': 'string', 'minLength': 1, 'description': 'Full name of the customer.'},
    'email': {'type': 'string', 'pattern': '^[^@ ]+@[^@ ]+\\.[a-z]+$', 'description': 'Contact email.'},
    'quantity': {'type': 'integer', 'minimum': 1, 'maximum': 99},
    'amount': {'type': 'number', 'minimum': 0, 'description': 'Amount in US dollars.'},
    'date': {'type': 'string', 'pattern': '^\\d{4}-\\d{2}-\\d{2}$', 'description': 'A date, YYYY-MM-DD.'},
    'time_slot': {'type': 'string', 'enum': ['morning', 'midday', 'afternoon', 'evening']},
    'priority': {'type': 'string', 'enum': ['low', 'normal', 'high', 'urgent']},
    'channel': {'type': 'string', 'enum': ['email', 'sms', 'phone', 'post']},
    'express': {'type': 'boolean', 'description': 'Faster handling for a fee.'},
    'duration_minutes': {'type': 'integer', 'minimum': 15, 'maximum': 240, 'multipleOf': 15},
    'tags': {'type': 'array', 'items': {'type': 'string'}, 'maxItems': 5, 'uniqueItems': True},
    'notes': {'type': 'string', 'maxLength': 200},
}
OPERATIONS = ('create', 'get', 'update', 'list', 'delete')
VERBS = {'create': ('create', 'add', 'new', 'register', 'open'), 'get': ('get', 'fetch', 'lookup', 'show'),
         'update': ('update', 'modify', 'edit', 'change'), 'list': ('list', 'search', 'find'),
         'delete': ('delete', 'cancel', 'remove')}
DESCRIPTIONS = {'create': 'Creates a {entity} in the {domain} system and returns it with its new id.',
                'get': 'Returns the {entity} with the given id.',
                'update': 'Changes the given fields of the {entity} with the given id; returns it.',
                'list': "Lists the {domain} system's {entity} records, optionally only those matching the filters.",
                'delete': 'Deletes the {entity} with the given id.'}


@dataclasses.dataclass(frozen=True)
class SyntheticTool:
  """An evolved tool: its OpenAI function spec, what it does (one of OPERATIONS) to which store `collection`, and
  the prefix of that collection's ids."""
  spec: Mapping[str, Any]
  operation: str
  collection: str
  id_prefix: str

  @property
  def name(self) -> str:
    return self.spec['function']['name']


@dataclasses.dataclass(frozen=True)
class SyntheticDomain:
  category: str
  name: str
  tools: tuple[SyntheticTool, ...]


def _entity_tools(rng: random.Random, domain: str, entity: str) -> list[SyntheticTool]:
  """The tools of one entity: drawn fields (enums narrowed), a drawn required subset, operations and verbs."""
  fields = {}
  for field in rng.sample(sorted(FIELDS), rng.randint(2, 5)):
    schema = dict(FIELDS[field])
    if 'enum' in schema:
      schema['enum'] = sorted(rng.sample(schema['enum'], rng.randint(2, len(schema['enum']))))
    fields[field] = schema
  required = sorted(rng.sample(sorted(fields), rng.randint(1, len(fields))))
  prefix = ''.join(word[0] for word in entity.split('_')).upper() + domain[:2].upper()
  id_schema = {'type': 'string', 'pattern': f'^{prefix}-\\d+$', 'description': f'The {entity} id, like {prefix}-1.'}
  enums = sorted(name for name, schema in fields.items() if 'enum' in schema or schema['type'] == 'boolean')
  parameters = {
      'create': {'properties': fields, 'required': required},
      'get': {'properties': {'id': id_schema}, 'required': ['id']},
      'update': {'properties': {'id': id_schema} | fields, 'required': ['id'], 'minProperties': 2},
      'list': {'properties': {name: fields[name] for name in enums}
               | {'limit': {'type': 'integer', 'minimum': 1, 'maximum': 50}}, 'required': []},
      'delete': {'properties': {'id': id_schema}, 'required': ['id']}}
  operations = ['create', 'get'] + [op for op in ('update', 'list', 'delete') if rng.random() < 0.7]
  tools = []
  for op in operations:
    name = f'{rng.choice(VERBS[op])}_{entity}' + ('s' if op == 'list' else '')
    spec = {'type': 'function', 'function': {
        'name': name, 'description': DESCRIPTIONS[op].format(entity=entity.replace('_', ' '), domain=domain),
        'parameters': {'type': 'object', **parameters[op], 'additionalProperties': False}}}
    tools.append(SyntheticTool(spec, op, entity, prefix))
  return tools


def evolve_domains(seed: int, domains_per_category: int = 2) -> list[SyntheticDomain]:
  """Every TAXONOMY category grows `domains_per_category` of its domains, each one or two entities' tools (see the
  module docstring); a pure function of the arguments."""
  if not 1 <= domains_per_category <= min(len(domains) for domains in TAXONOMY.values()):
    raise ValueError(f'domains_per_category must be in [1, {min(len(d) for d in TAXONOMY.values())}], '
                     f'got {domains_per_category}')
  rng = random.Random(f'toolspecs/{seed}')
  out = []
  for category in sorted(TAXONOMY):
    for domain in rng.sample(sorted(TAXONOMY[category]), domains_per_category):
      entities = rng.sample(TAXONOMY[category][domain], rng.randint(1, 2))
      out.append(SyntheticDomain(category, domain,
                                 tuple(tool for entity in entities for tool in _entity_tools(rng, domain, entity))))
  return out


# --- the tool simulator -------------------------------------------------------------------------------------------

class ToolSimulator:
  """One episode's backend for synthetic tools (see the module docstring): `simulator(call)` -> (result text, error
  kind or None), error kinds as k2.gym.execute's plus 'transient'. `store[collection][id]` holds the records and
  `last_id[collection]` the number of the newest id issued (a create makes `<id_prefix>-<last_id + 1>`); both live
  in `db` ({'records': store, 'last_id': ...}, filled in where missing), which the tools change in place, so a
  k2.gym episode database can hold them (k2.synth.agents) and its final state be compared with the gold one."""

  def __init__(self, tools: Sequence[SyntheticTool], seed: int = 0, failure_rate: float = 0.0,
               db: dict[str, Any] | None = None):
    if not 0.0 <= failure_rate < 1.0:
      raise ValueError(f'failure_rate must be in [0, 1), got {failure_rate}')
    self.failure_rate = failure_rate
    self.failures = random.Random(f'toolsim/failures/{seed}')
    db = {} if db is None else db
    self.store: dict[str, dict[str, dict[str, Any]]] = db.setdefault('records', {})
    self.last_id: dict[str, int] = db.setdefault('last_id', {})
    for tool in tools:
      self.store.setdefault(tool.collection, {})
      self.last_id.setdefault(tool.collection, 0)
    self.tools = {tool.name: Tool(fn=self._function(tool), spec=tool.spec) for tool in tools}

  def __call__(self, call: ToolCall) -> tuple[str, str | None]:
    if self.failure_rate and self.failures.random() < self.failure_rate:
      return TRANSIENT_ERROR, 'transient'
    return execute(call, self.tools)

  def _function(self, tool: SyntheticTool):
    def run(**arguments: Any) -> Any:
      return self._run(tool, arguments)
    return run

  def _run(self, tool: SyntheticTool, arguments: dict[str, Any]) -> Any:
    records = self.store[tool.collection]
    if tool.operation == 'create':
      self.last_id[tool.collection] += 1
      record = {'id': f'{tool.id_prefix}-{self.last_id[tool.collection]}'} | arguments
      records[record['id']] = record
      return record
    if tool.operation == 'list':
      limit = arguments.pop('limit', 50)
      found = [r for r in records.values() if all(r.get(key) == value for key, value in arguments.items())]
      return {'count': len(found), 'items': found[:limit]}
    record_id = arguments.pop('id')
    if record_id not in records:
      return f'error: not found: no {tool.collection} with id {record_id}'
    if tool.operation == 'get':
      return records[record_id]
    if tool.operation == 'update':
      records[record_id].update(arguments)
      return records[record_id]
    del records[record_id]
    return {'deleted': record_id}
