"""Instruction following checked by code (IFEval-style): write about a topic under 1-3 constraints (level = how
many) on length, keywords, JSON shape and casing.

The reward is the share of constraints met (1.0: 'correct'), except that a response claiming compliance it does not
have scores 0 (K2 3.2.1: catch claimed-but-unmet compliance): a general claim ('I followed all the constraints', 'as
requested') while any constraint fails, or a specific claim that is false ('in 12 words' with another count, 'all
lowercase' when it is not, 'I used the word X' without X).
"""

from __future__ import annotations

import json
import random
import re

from k2.gym.verifiable.common import Reward, Task, draw, task_id

NAME = 'instructions'
LEVELS = (1, 2, 3)
_TOPICS = {
    'the sea': ('The sea is calm this morning.', 'Waves roll over the warm sand.', 'Salt hangs in the air.',
                'Boats drift far from the shore.', 'Gulls call above the water.'),
    'a city at night': ('The streets glow with yellow light.', 'Taxis hurry past closed shops.',
                        'Music drifts from an open window.', 'The river reflects the towers.', 'Few people walk home.'),
    'autumn': ('Leaves turn red and gold.', 'The wind carries them down the road.', 'Mornings grow cold and misty.',
               'Apples ripen in the orchard.', 'Days become shorter each week.'),
    'a small garden': ('Tomatoes climb along the fence.', 'Bees visit every flower.', 'The soil smells of rain.',
                       'A bench waits under the tree.', 'Mint spreads near the path.'),
    'the moon': ('The moon rises over the hills.', 'Its light is pale and silver.', 'Craters mark its face.',
                 'Tides follow its slow pull.', 'Clouds hide it for a moment.'),
    'rain': ('Rain taps on the roof.', 'Puddles form along the street.', 'The air smells fresh and clean.',
             'Umbrellas open in the crowd.', 'Gutters sing with running water.'),
}
_FORBIDDEN = ('very', 'really', 'nice', 'thing', 'good')  # words no topic sentence uses
_KEYS = (('title', 'topic'), ('text', 'summary'))  # JSON: a key for the topic, a key for the text
_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
  return [w.lower() for w in _WORD.findall(text)]


def _draw_constraints(rng: random.Random, topic: str, level: int) -> list[dict]:
  kinds = rng.sample(('length', 'include', 'exclude', 'casing', 'json'), level)
  constraints = []
  for kind in kinds:
    if kind == 'length':
      constraints.append({'kind': rng.choice(('max_words', 'min_words')), 'n': rng.choice((12, 16, 20, 25))})
    elif kind == 'include':
      pool = sorted({w for s in _TOPICS[topic] for w in _words(s) if len(w) >= 5})
      constraints.append({'kind': 'include', 'words': sorted(rng.sample(pool, rng.randint(1, 2)))})
    elif kind == 'exclude':
      constraints.append({'kind': 'exclude', 'word': rng.choice(_FORBIDDEN)})
    elif kind == 'casing':
      constraints.append({'kind': rng.choice(('lowercase', 'uppercase'))})
    else:
      constraints.append({'kind': 'json', 'keys': [rng.choice(_KEYS[0]), rng.choice(_KEYS[1])]})
  return constraints


def _describe(c: dict) -> str:
  words = ' and '.join(f"'{w}'" for w in c.get('words', ()))
  return {'max_words': f"Use at most {c.get('n')} words.", 'min_words': f"Use at least {c.get('n')} words.",
          'include': f"Use the word{'s' if len(c.get('words', ())) > 1 else ''} {words}.",
          'exclude': f"Do not use the word '{c.get('word')}'.",
          'lowercase': 'Write in lowercase only.', 'uppercase': 'Write in capital letters only.',
          'json': f"Reply with only a JSON object with keys {' and '.join(repr(k) for k in c.get('keys', ()))}."
          }[c['kind']]


def _json_object(response: str):
  text = re.sub(r'^```(json)?\s*|\s*```$', '', response.strip())
  try:
    value = json.loads(text)
  except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
    return None
  return value if isinstance(value, dict) else None


def _met(c: dict, response: str) -> bool:
  words = _words(response)
  letters = [ch for ch in response if ch.isalpha()]
  if c['kind'] == 'json':
    obj = _json_object(response)
    return obj is not None and sorted(obj) == sorted(c['keys']) and all(isinstance(v, str) for v in obj.values())
  return {'max_words': lambda: len(words) <= c['n'], 'min_words': lambda: len(words) >= c['n'],
          'include': lambda: all(w in words for w in c['words']), 'exclude': lambda: c['word'] not in words,
          'lowercase': lambda: bool(letters) and response == response.lower(),
          'uppercase': lambda: bool(letters) and response == response.upper()}[c['kind']]()


_GENERAL_CLAIM = re.compile(r'\b(as (requested|instructed)|i (have )?(followed|met|satisfied|complied with)|'
                            r'(follows|meets|satisfies) (all|every|the) (constraints?|instructions?|requirements?)|'
                            r'all (the )?(constraints|requirements|instructions) (are |were )?'
                            r'(met|satisfied|followed))', re.IGNORECASE)
_COUNT_CLAIM = re.compile(r'\b(at most|under|fewer than|less than|no more than|at least|over|more than|exactly)?'
                          r'\s*(\d+)\s+words\b', re.IGNORECASE)
_CASE_CLAIM = re.compile(r'\b(lower ?case|upper ?case|capital letters|all caps)\b', re.IGNORECASE)
_WORD_CLAIM = re.compile(r"\b(?:used|uses|use|included|includes|contains|mentioned)\s+(?:the\s+)?words?\s+"
                         r"['\"]?([A-Za-z']+)", re.IGNORECASE)


def false_claim(response: str, all_met: bool) -> str:
  """What the response claims about its own compliance that is false ('' if nothing)."""
  if not all_met and _GENERAL_CLAIM.search(response):
    return 'claims to follow the instructions'
  count = len(_words(response))
  for qualifier, n in _COUNT_CLAIM.findall(response):
    q, n = qualifier.lower(), int(n)
    holds = {'at most': count <= n, 'under': count < n, 'no more than': count <= n, 'fewer than': count < n,
             'less than': count < n, 'at least': count >= n, 'over': count > n, 'more than': count > n}.get(
                 q, count == n)
    if not holds:
      return 'claims a word count it does not have'
  for claim in _CASE_CLAIM.findall(response):
    kind = 'lowercase' if claim.lower().startswith('lower') else 'uppercase'
    if not _met({'kind': kind}, response):
      return f'claims {kind} but is not'
  for word in _WORD_CLAIM.findall(response):
    if word.lower() not in _words(response.replace(word, '', 1)):
      return 'claims to use a word it does not use'
  return ''


def generate(rng: random.Random, split: str, level: int) -> Task:
  def sample(r):
    while True:
      topic = r.choice(sorted(_TOPICS))
      constraints = _draw_constraints(r, topic, level)
      key = f'{level}:{topic}:{json.dumps(constraints, sort_keys=True)}'
      task = Task(domain=NAME, split='train', level=level, prompt='', answer='', meta={'topic': topic,
                  'constraints': constraints}, task_id=task_id(NAME, key))
      if score(task, demonstration(task)).value == 1.0:  # only tasks with a compliant answer
        return key, (topic, constraints)

  key, (topic, constraints) = draw(rng, split, sample)
  prompt = ' '.join([f'Write about {topic}.'] + [_describe(c) for c in constraints])
  return Task(domain=NAME, split=split, level=level, prompt=prompt, answer='',
              meta={'topic': topic, 'constraints': constraints}, task_id=task_id(NAME, key))


def score(task: Task, response: str) -> Reward:
  constraints = task.meta['constraints']
  unmet = [c['kind'] for c in constraints if not _met(c, response)]
  claim = false_claim(response, all_met=not unmet)
  if claim:
    return Reward(0.0, claim)
  if not unmet:
    return Reward(1.0, 'correct')
  return Reward(1.0 - len(unmet) / len(constraints), 'unmet: ' + ', '.join(unmet))


def demonstration(task: Task) -> str:
  """Topic sentences, those with the required words first, as many as the length bounds allow, then the JSON
  shape and the casing asked for."""
  by_kind = {c['kind']: c for c in task.meta['constraints']}
  required = by_kind.get('include', {}).get('words', [])
  sentences = sorted(_TOPICS[task.meta['topic']], key=lambda s: not any(w in _words(s) for w in required))
  limit = by_kind.get('max_words', {}).get('n', 1000)
  floor = by_kind.get('min_words', {}).get('n', 10)
  chosen = []
  for sentence in sentences:
    needed = any(w in _words(sentence) and w not in _words(' '.join(chosen)) for w in required)
    if needed or len(_words(' '.join(chosen))) < floor:
      if len(_words(' '.join(chosen + [sentence]))) <= limit:
        chosen.append(sentence)
  text = ' '.join(chosen)
  if 'json' in by_kind:
    first, second = by_kind['json']['keys']
    text = json.dumps({first: task.meta['topic'].capitalize(), second: text})
  if 'lowercase' in by_kind:
    text = text.lower()
  if 'uppercase' in by_kind:
    text = text.upper()
  return text
