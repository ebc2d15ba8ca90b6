"""4x4 Sudoku: fill the blanks so that every row, column and 2x2 box holds 1-4 once.

Puzzles come from a solved grid under the symmetries that keep a grid valid (digit relabelling, row and column
swaps within and across bands, transposition); `level` sets how many cells are blank (4, 6, 8, 10); only
puzzles with a unique solution are drawn. The answer line lists the four rows ('Answer: 1234 3412 2143 4321'); any
grid that keeps the givens and obeys the rules scores 1.
"""

from __future__ import annotations

import random

from k2.gym.verifiable.common import Reward, Task, draw, final_answer, task_id

NAME = 'sudoku'
LEVELS = (1, 2, 3, 4)
_BLANKS = {1: 4, 2: 6, 3: 8, 4: 10}
_BASE = ((1, 2, 3, 4), (3, 4, 1, 2), (2, 1, 4, 3), (4, 3, 2, 1))
_UNITS = ([[(r, c) for c in range(4)] for r in range(4)] + [[(r, c) for r in range(4)] for c in range(4)] +
          [[(r, c) for r in (br, br + 1) for c in (bc, bc + 1)] for br in (0, 2) for bc in (0, 2)])


def _valid(grid: list[list[int]]) -> bool:
  return all(sorted(grid[r][c] for r, c in unit) == [1, 2, 3, 4] for unit in _UNITS)


def _count_solutions(grid: list[list[int]], limit: int = 2) -> int:
  cells = [(r, c) for r in range(4) for c in range(4) if grid[r][c] == 0]
  if not cells:
    return int(_valid(grid))
  r, c = cells[0]
  total = 0
  for digit in range(1, 5):
    if all(grid[rr][cc] != digit for unit in _UNITS if (r, c) in unit for rr, cc in unit):
      grid[r][c] = digit
      total += _count_solutions(grid, limit - total)
      grid[r][c] = 0
      if total >= limit:
        break
  return total


def _random_grid(rng: random.Random) -> list[list[int]]:
  digits = rng.sample(range(1, 5), 4)
  order = [band * 2 + row for band in rng.sample((0, 1), 2) for row in rng.sample((0, 1), 2)]
  columns = [band * 2 + col for band in rng.sample((0, 1), 2) for col in rng.sample((0, 1), 2)]
  grid = [[digits[_BASE[r][c] - 1] for c in columns] for r in order]
  return [list(row) for row in zip(*grid)] if rng.random() < 0.5 else grid


def _rows(grid: list[list[int]]) -> str:
  return ' '.join(''.join(str(d) if d else '.' for d in row) for row in grid)


def generate(rng: random.Random, split: str, level: int) -> Task:
  def sample(r):
    while True:
      solution = _random_grid(r)
      puzzle = [row[:] for row in solution]
      for cell in r.sample(range(16), _BLANKS[level]):
        puzzle[cell // 4][cell % 4] = 0
      if _count_solutions([row[:] for row in puzzle]) == 1:
        return _rows(puzzle), (puzzle, solution)

  key, (puzzle, solution) = draw(rng, split, sample)
  prompt = f"Fill in the 4x4 sudoku {_rows(puzzle)} (. is blank). End with 'Answer:' and the four rows."
  return Task(domain=NAME, split=split, level=level, prompt=prompt, answer=_rows(solution),
              meta={'puzzle': puzzle}, task_id=task_id(NAME, key))


def score(task: Task, response: str) -> Reward:
  text, why = final_answer(response)
  if text is None:
    return Reward(0.0, why)
  digits = [ch for ch in text if not ch.isspace() and ch not in ',/|']
  if len(digits) != 16 or any(ch not in '1234' for ch in digits):
    return Reward(0.0, 'answer is not 16 digits 1-4')
  grid = [[int(digits[r * 4 + c]) for c in range(4)] for r in range(4)]
  if any(given and given != grid[r][c] for r, row in enumerate(task.meta['puzzle']) for c, given in enumerate(row)):
    return Reward(0.0, 'changes a given digit')
  return Reward(1.0, 'correct') if _valid(grid) else Reward(0.0, 'breaks a sudoku rule')


def demonstration(task: Task) -> str:
  return f'Answer: {task.answer}'
