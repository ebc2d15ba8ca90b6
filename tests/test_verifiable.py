"""The verifiable-reward gym: gold demonstrations score 1, wrong or malformed answers score 0 with a reason and never
raise, splits are disjoint, false compliance claims and sandbox cheats earn nothing."""

import dataclasses
import random

import pytest

from k2.gym import verifiable
from k2.gym.verifiable import code, game24, instructions, sudoku


@pytest.mark.parametrize('domain', sorted(verifiable.DOMAINS))
def test_demonstrations_score_one_on_every_level_and_split(domain):
  for level in verifiable.DOMAINS[domain].LEVELS:
    for split in ('train', 'heldout'):
      for task in verifiable.sample_tasks(domain, 2 if domain == 'code' else 5, seed=1, split=split, level=level):
        assert (task.domain, task.split, task.level) == (domain, split, level)
        assert len(task.prompt) < 200  # the CPU demo's model has 1024 positions
        assert verifiable.score(task, verifiable.demonstration(task)) == verifiable.Reward(1.0, 'correct')


def test_column_arithmetic_scores_one_and_every_column_is_a_single_digit_fact():
  """Column-by-column working: right on every level and split, and built only from single-digit facts (with a carry
  or borrow), so a held-out sum is made of steps that training sums show too."""
  from k2.gym.verifiable import arithmetic
  columns = 0
  for level in arithmetic.LEVELS:
    for split in ('train', 'heldout'):
      for task in verifiable.sample_tasks('arithmetic', 20, seed=2, split=split, level=level):
        gold = arithmetic.column_demonstration(task)
        assert verifiable.score(task, gold) == verifiable.Reward(1.0, 'correct')
        for line in gold.splitlines()[:-1]:
          if ':' not in line:
            continue
          for step in line.split(': ')[1].split(', ')[:-1]:
            left, right = step.split(' = ')
            terms = left.split()
            assert eval(left) == int(right), step  # noqa: S307 (our own digits and + / -)
            assert all(len(t) == 1 for t in terms[2:]) and len(terms[0]) <= 2, step
            columns += 1
  assert columns > 100
  assert arithmetic.column_demonstration(_arithmetic_task(83, '-', 47)).startswith(
      '83 - 47: 13 - 7 = 6, 8 - 1 - 4 = 3, so 83 - 47 = 36')
  assert arithmetic.column_demonstration(_arithmetic_task(58, '+', 69)).startswith(
      '58 + 69: 8 + 9 = 17, 5 + 6 + 1 = 12, 0 + 0 + 1 = 1, so 58 + 69 = 127')


def _arithmetic_task(start, op, n):
  task = verifiable.sample_tasks('arithmetic', 1, seed=0, level=2)[0]
  return dataclasses.replace(task, meta={'start': start, 'steps': [[op, n]]})


@pytest.mark.parametrize('domain', ['arithmetic', 'game24', 'sudoku', 'instructions'])
def test_splits_are_disjoint_and_sampling_is_deterministic(domain):
  train = verifiable.sample_tasks(domain, 150, seed=0, split='train')
  heldout = verifiable.sample_tasks(domain, 40, seed=0, split='heldout')
  assert not {t.task_id for t in train} & {t.task_id for t in heldout}
  assert verifiable.sample_tasks(domain, 150, seed=0, split='train') == train
  assert verifiable.sample_tasks(domain, 150, seed=1, split='train') != train


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='unknown verifiable domain'):
    verifiable.sample_tasks('chess', 1, seed=0)
  with pytest.raises(ValueError, match='levels'):
    verifiable.sample_tasks('arithmetic', 1, seed=0, level=9)
  with pytest.raises(ValueError, match='unknown split'):
    verifiable.sample_tasks('arithmetic', 1, seed=0, split='test')


def test_arithmetic_levels_are_graded():
  steps = {level: {len(t.meta['steps']) for t in verifiable.sample_tasks('arithmetic', 20, 0, level=level)}
           for level in (1, 3, 5)}
  assert steps == {1: {1}, 3: {2}, 5: {3}}
  two_digit = verifiable.sample_tasks('arithmetic', 20, 0, level=2)
  assert all(10 <= t.meta['start'] <= 99 for t in two_digit)


def arithmetic_task(answer='12'):
  task = verifiable.sample_tasks('arithmetic', 1, seed=0)[0]
  return dataclasses.replace(task, answer=answer)


@pytest.mark.parametrize('response,expected', [
    ('5 + 7 = 12\nAnswer: 12', (1.0, 'correct')),
    ('Answer: 12.0', (1.0, 'correct')),
    ('Answer: 24/2', (1.0, 'correct')),
    ('Answer: 12 pens.', (1.0, 'correct')),
    ('answer:12', (1.0, 'correct')),
    ('Answer: 13', (0.0, 'wrong answer')),
    ('The answer is 12', (0.0, 'no "Answer:" line')),
    ('Answer: 12\nAnswer: 13', (0.0, 'several different answers')),
    ('Answer: twelve', (0.0, 'answer is not a number')),
    ('Answer: 1/0', (0.0, 'answer is not a number')),
])
def test_arithmetic_answers_are_compared_exactly(response, expected):
  reward = verifiable.score(arithmetic_task(), response)
  assert (reward.value, reward.reason) == expected


def test_fractional_answers_compare_as_rationals():
  assert verifiable.score(arithmetic_task('3/4'), 'Answer: 0.75').value == 1.0
  assert verifiable.score(arithmetic_task('3/4'), 'Answer: 6/8').value == 1.0
  assert verifiable.score(arithmetic_task('3/4'), 'Answer: 0.7').value == 0.0


def game24_task(numbers):
  return verifiable.Task(domain='game24', split='train', level=1, prompt='', answer=game24.solve(numbers),
                         meta={'numbers': numbers}, task_id='t')


@pytest.mark.parametrize('response,expected', [
    ('Answer: 8/(3-8/3)', (1.0, 'correct')),             # any valid expression, in exact fractions
    ('Answer: 8 / (3 - 8 / 3) = 24', (1.0, 'correct')),
    ('Answer: 8*3', (0.0, 'numbers differ from the given four')),
    ('Answer: 8+8+3+3', (0.0, 'does not make 24')),
    ('Answer: 8/(3-3)*8', (0.0, 'division by zero')),
    ('Answer: __import__("os").system("true")', (0.0, 'expression uses more than numbers and + - * /')),
    ('Answer: 8**3-3-8', (0.0, 'expression uses more than numbers and + - * /')),
    ('Answer: (8', (0.0, 'expression does not parse')),
])
def test_game24_expressions_are_parsed_safely(response, expected):
  reward = verifiable.score(game24_task([3, 3, 8, 8]), response)
  assert (reward.value, reward.reason) == expected


def test_game24_solver_finds_solutions_and_refuses_impossible_sets():
  assert game24.solve([1, 1, 1, 1]) is None
  for numbers in ([3, 3, 8, 8], [1, 5, 5, 5], [4, 7, 8, 8]):
    assert verifiable.score(game24_task(numbers), f'Answer: {game24.solve(numbers)}').value == 1.0


def test_sudoku_answers_must_keep_givens_and_rules():
  task = verifiable.sample_tasks('sudoku', 1, seed=0, level=2)[0]
  rows = task.answer.split()
  assert verifiable.score(task, 'Answer: ' + '/'.join(rows)).value == 1.0
  swapped = ' '.join(rows[1:2] + rows[:1] + rows[2:])  # a valid-looking grid that moves the givens
  assert verifiable.score(task, f'Answer: {swapped}').reason in ('changes a given digit', 'breaks a sudoku rule')
  blank = next(i for i, d in enumerate(sum(task.meta['puzzle'], [])) if d == 0)
  digits = list(''.join(rows))
  digits[blank] = str(int(digits[blank]) % 4 + 1)
  broken = ' '.join(''.join(digits[i:i + 4]) for i in range(0, 16, 4))
  assert verifiable.score(task, f'Answer: {broken}').reason == 'breaks a sudoku rule'
  assert verifiable.score(task, 'Answer: 1234').reason == 'answer is not 16 digits 1-4'


def instruction_task(*constraints):
  return verifiable.Task(domain='instructions', split='train', level=len(constraints), prompt='', answer='',
                         meta={'topic': 'rain', 'constraints': list(constraints)}, task_id='t')


@pytest.mark.parametrize('constraint,good,bad', [
    ({'kind': 'max_words', 'n': 5}, 'Rain taps on the roof.', 'Rain taps on the old roof.'),
    ({'kind': 'min_words', 'n': 5}, 'Rain taps on the roof.', 'Rain taps.'),
    ({'kind': 'include', 'words': ['roof', 'rain']}, 'Rain taps on the roof.', 'Rain taps on the window.'),
    ({'kind': 'exclude', 'word': 'very'}, 'Rain taps.', 'Very wet rain.'),
    ({'kind': 'lowercase'}, 'rain taps.', 'Rain taps.'),
    ({'kind': 'uppercase'}, 'RAIN TAPS.', 'RAIN Taps.'),
    ({'kind': 'json', 'keys': ['title', 'text']}, '```json\n{"title": "Rain", "text": "It taps."}\n```',
     '{"title": "Rain"}'),
])
def test_each_constraint_is_checked(constraint, good, bad):
  task = instruction_task(constraint)
  assert verifiable.score(task, good).value == 1.0
  assert verifiable.score(task, bad) == verifiable.Reward(0.0, 'unmet: ' + constraint['kind'])


def test_partial_compliance_earns_partial_reward_but_false_claims_earn_nothing():
  task = instruction_task({'kind': 'lowercase'}, {'kind': 'max_words', 'n': 6})
  assert verifiable.score(task, 'rain taps on the old tin roof.') == verifiable.Reward(0.5, 'unmet: max_words')
  for claim in ('rain taps on the old tin roof. i followed all the constraints.',
                'rain taps on the old tin roof, as requested.',
                'rain taps on the old tin roof (5 words).',
                'Rain taps. All lowercase.',
                'rain taps. i used the word roof.'):
    assert verifiable.score(task, claim).value == 0.0, claim
  assert verifiable.score(task, 'rain taps (2 words).').reason == 'claims a word count it does not have'
  # True claims cost nothing.
  assert verifiable.score(task, 'rain taps, in lowercase.').value == 1.0
  assert verifiable.score(instruction_task({'kind': 'min_words', 'n': 3}), 'Rain falls, in 5 words.').value == 1.0


def test_code_tasks_are_scored_by_hidden_tests_in_the_sandbox():
  task = verifiable.sample_tasks('code', 1, seed=0, level=1)[0]
  assert 'cases' not in task.prompt and task.meta['cases']
  gold = verifiable.demonstration(task)
  assert verifiable.score(task, 'Here it is:\n' + gold + '\nDone.').value == 1.0
  assert verifiable.score(task, 'def solve(xs): return 0').reason == 'no ```python block'
  for cheat in ('import sys\nprint("all tests passed")\nsys.exit(0)\n', 'def solve(*a):\n  return "PASS"\n'):
    assert verifiable.score(task, f'```python\n{cheat}```').value == 0.0
  looping = code.score(task, '```python\ndef solve(*a):\n  while True:\n    pass\n```', timeout_s=1.0)
  assert looping.value == 0.0 and looping.reason.startswith('sandbox timeout')


ADVERSARIAL = ['', 'Answer:', 'Answer: ' + '(' * 5000, 'Answer: ' + '9' * 10000, 'Answer: 10**10**10', '\x00' * 10,
               'Answer: \x00', '[' * 100000, '{"a": ' * 50000, '```python\n' + 'x = (' * 500 + '\n```', 'A' * 200000,
               'Answer: 1e309', 'Answer: nan', 'Answer: -0', 'Answer: ١٢']


@pytest.mark.parametrize('domain', sorted(set(verifiable.DOMAINS) - {'code'}))
def test_scores_never_raise_on_malformed_responses(domain):
  rng = random.Random(0)
  tasks = verifiable.sample_tasks(domain, 3, seed=0)
  noise = [''.join(rng.choice('Answer: 0123456789()+-*/.{}[]",\n abcxyz') for _ in range(rng.randint(0, 80)))
           for _ in range(200)]
  for task in tasks:
    for response in ADVERSARIAL + noise:
      reward = verifiable.score(task, response)
      assert 0.0 <= reward.value <= 1.0 and reward.reason and not reward.reason.startswith('checker failed')
  assert verifiable.score(tasks[0], None) == verifiable.Reward(0.0, 'response is NoneType, not text')


def test_code_scores_never_raise_on_malformed_responses():
  task = verifiable.sample_tasks('code', 1, seed=0)[0]
  for response in ADVERSARIAL[-6:] + ['```python\nimport os\nos.kill(os.getppid(), 9)\n```']:
    reward = verifiable.score(task, response)
    assert reward.value == 0.0 and reward.reason and not reward.reason.startswith('checker failed')


def test_instructions_false_claim_helper_is_exposed_for_metrics():
  assert instructions.false_claim('done, as requested', all_met=False) == 'claims to follow the instructions'
  assert instructions.false_claim('done, as requested', all_met=True) == ''
