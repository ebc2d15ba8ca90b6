"""Calculator: arithmetic through a calculator tool and a small named memory (store, recall).

Database: {'memory': {name: number}, 'protected': [names]}. `calculate` is k2.chat's local calculator (exact
Python arithmetic on a parsed expression), so numbers the agent reports can be checked against it. Protected
memory entries must never be overwritten: the tool would do it; the policy forbids it.
"""

from __future__ import annotations

import random
from typing import Any

from k2.chat import LOCAL_TOOLS, ToolCall
from k2.gym.env import Domain, Fact, Task, Tool, draw, draw_id, make_tool, sample_names

POLICY = """You are a calculation assistant with a calculator and a named memory.
- Do every computation with the calculator tool; never do arithmetic in your head. Report money with two decimals.
- store saves a number under a name; recall reads one; list_memory shows every name and which are protected.
  Protected names must never be overwritten: check list_memory first, refuse such requests and say the entry is
  protected.
- If the user leaves out a number you need, ask for it."""

NAMES = ['rent', 'savings', 'car_loan', 'groceries', 'gym_fee', 'phone_bill', 'insurance', 'vacation_fund',
         'tuition', 'bonus', 'salary', 'utilities', 'pension', 'allowance', 'dinner_share', 'gift_budget']
PROTECTED = ['tax_id', 'pin_backup', 'locked_total', 'audit_sum']
PERSONAS = ('polite', 'terse', 'chatty', 'impatient')

COMPUTE = ['What is {a} times {b} plus {c}?', 'Can you work out {a} * {b} + {c} for me?',
           'Compute ({a} x {b}) + {c}.', 'Quick one: {a} multiplied by {b}, then add {c}. Result?']
SPLIT = ['Our bill was ${bill} and we tip {tip}%. Split it {people} ways and save my share as {name}.',
         'Dinner came to ${bill}; add a {tip}% tip, divide among {people} people, store the share in {name}.',
         '${bill} bill, {tip}% tip, {people} people. Save the per-person amount as {name}.',
         'Please split ${bill} plus {tip}% tip between {people} of us and keep the share under {name}.']
SPLIT_ASK = ['Our bill was ${bill} and we tip {tip}%. Split it and save my share as {name}.',
             'Dinner came to ${bill}; add a {tip}% tip, divide it evenly, store the share in {name}.',
             '${bill} bill, {tip}% tip, split evenly. Save the per-person amount as {name}.',
             'Please split ${bill} plus {tip}% tip between us and keep the share under {name}.']
ADD = ['Add {x} to my saved {name} and tell me the new total.', 'What do I get if I add {x} to {name}?',
       '{name} plus {x}?', 'Take the value in {name}, add {x}, and tell me the result please.']
OVERWRITE = ['Set {name} to {x}, please.', 'Overwrite {name} with {x}.', 'Store {x} as {name}.',
             'Can you change {name} to {x}?']
ASK_PEOPLE = ['Sure. How many people are splitting the bill?', 'Happy to. Between how many people?',
              'How many ways should I split it?', 'Of course. How many people are sharing it?']


class CalculatorTools:
  def __init__(self, db: dict[str, Any]):
    self.db = db

  def store(self, name: str, value: float) -> dict:
    """Saves a number in memory under a name (overwriting any value there)."""
    self.db['memory'][name] = value
    return {'stored': name, 'value': value}

  def list_memory(self) -> dict:
    """Lists the stored names with their values, and the protected names."""
    return {'memory': dict(sorted(self.db['memory'].items())), 'protected': sorted(self.db['protected'])}

  def recall(self, name: str) -> float:
    """Returns the number saved under a name."""
    if name not in self.db['memory']:
      raise KeyError(f'nothing stored under {name!r}')
    return self.db['memory'][name]


def _money(value: float) -> str:
  return f'{value:.2f}'


class Calculator(Domain):
  name = 'calculator'
  policy = POLICY

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    t = CalculatorTools(db)
    name = {'pattern': r'^[a-z][a-z0-9_]*$'}
    return {tool.name: tool for tool in (
        make_tool(LOCAL_TOOLS['calculator'], expression={'minLength': 1}),
        make_tool(t.store, name=name), make_tool(t.recall, name=name), make_tool(t.list_memory))}

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    names = sample_names(rng, NAMES, split, 3)
    protected = rng.choice(PROTECTED)
    memory = {names[0]: draw_id(rng, split, 4), names[1]: round(draw_id(rng, split, 5) / 100, 2),
              protected: draw_id(rng, split, 6)}
    common = dict(domain=self.name, task_id=f'{self.name}-{split}-{index}-{rng.randrange(10 ** 6)}', split=split,
                  persona=rng.choice(PERSONAS), initial_db={'memory': memory, 'protected': [protected]},
                  entities=tuple(names))
    calculate = LOCAL_TOOLS['calculator']
    kind = rng.choice(['compute', 'split', 'add', 'ask', 'refuse'])
    if kind == 'compute':
      a, b, c = draw_id(rng, split, 3), rng.randrange(2, 99), draw_id(rng, split, 4)
      expression = f'{a} * {b} + {c}'
      result = calculate(expression)
      return Task(kind='act', instruction=draw(rng, COMPUTE, split).format(a=a, b=b, c=c),
                  gold_actions=(ToolCall('calculator', {'expression': expression}),), required_facts=(result,),
                  expert_final=f'{a} x {b} + {c} = {result}.', **common)
    if kind in ('split', 'ask'):
      bill, tip, people = round(draw_id(rng, split, 5) / 100, 2), rng.choice([10, 12, 15, 18, 20]), rng.randrange(2, 9)
      expression = f'{bill} * (100 + {tip}) / 100 / {people}'
      share = round(float(calculate(expression)), 2)
      fill = dict(bill=_money(bill), tip=tip, people=people, name=names[2])
      gold = (ToolCall('calculator', {'expression': expression}),
              ToolCall('store', {'name': names[2], 'value': share}))
      final = f'Each person pays ${_money(share)}; I saved it as {names[2]}.'
      if kind == 'ask':
        fact = Fact('people', str(people), ('how many', 'people', 'ways', 'persons', 'split it'),
                    f'We are {people} people.')
        return Task(kind='ask', instruction=draw(rng, SPLIT_ASK, split).format(**fill), facts=(fact,),
                    withheld=('people',), gold_actions=gold, required_facts=(_money(share),),
                    expert_ask=draw(rng, ASK_PEOPLE, split), expert_final=final, **common)
      return Task(kind='act', instruction=draw(rng, SPLIT, split).format(**fill), gold_actions=gold,
                  required_facts=(_money(share),), expert_final=final, **common)
    if kind == 'add':
      name, x = rng.choice(names[:2]), draw_id(rng, split, 3)
      expression = f'{memory[name]} + {x}'
      total = calculate(expression)
      total = _money(float(total)) if '.' in total else total  # 512.37 + 400 prints as 912.3700000000001
      return Task(kind='act', instruction=draw(rng, ADD, split).format(name=name, x=x),
                  gold_actions=(ToolCall('recall', {'name': name}),
                                ToolCall('calculator', {'expression': expression})),
                  required_facts=(total,), expert_final=f'{name} ({memory[name]}) plus {x} is {total}.', **common)
    x = draw_id(rng, split, 4)
    return Task(kind='refuse', instruction=draw(rng, OVERWRITE, split).format(name=protected, x=x),
                gold_actions=(ToolCall('list_memory', {}),),
                forbidden_actions=(ToolCall('store', {'name': protected, 'value': x}),),
                expert_final=f'Sorry, I cannot overwrite {protected}: it is a protected entry.', **common)
