"""Where a run's numbers go: metrics.jsonl and TensorBoard event files in the workdir, and a console line.

metrics.jsonl holds one JSON object per logged step. On resume, records after the restored step (written by the
interrupted process after its last checkpoint) are dropped, so the file reads as one uninterrupted run.
TensorBoard files are written with tensorboard's own event writer (no TensorFlow needed); view them with
`tensorboard --logdir WORKDIR/tensorboard`.
"""

from __future__ import annotations

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(self.path + '.tmp', self.path)
    self._jsonl = open(self.path, 'a')
    self._events = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    record = {'step': int(step), **{key: float(value) for key, value in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    values = [summary_pb2.Summary.Value(tag=key, simple_value=value) for key, value in record.items()
              if key != 'step']
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))
    self._events.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._events.close()


class NullWriter:
  """What processes other than the first write: nothing."""

  def write(self, step: int, metrics: dict[str, float]) -> None:
    del step, metrics

  def close(self) -> None:
    pass


class StepTimer:
  """Throughput and ETA from logged steps. The first step after (re)start includes compilation, so the ETA is timed
  from its end: after the second logged step it is the measured seconds per step times the steps left."""

  def __init__(self, start_step: int, num_steps: int):
    self.start_step, self.num_steps = start_step, num_steps
    self._last_time, self._last_step = time.time(), start_step
    self._first_logged: tuple[float, int] | None = None

  def logged(self, step: int, record: dict, tokens_per_step: int | None) -> None:
    """Called when `step` is logged; adds tokens_per_second (since the last logged step) to record."""
    now = time.time()
    if tokens_per_step:
      record['tokens_per_second'] = tokens_per_step * (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    if self._first_logged is None:
      self._first_logged = (now, step)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of the next tokens_per_second; the ETA keeps them (evals recur)."""
    self._last_time += seconds

  def eta(self, step: int) -> float | None:
    """Seconds left, or None before a step past the first has been timed."""
    first_time, first_step = self._first_logged or (0.0, step)
    if step <= first_step:
      return None
    return (time.time() - first_time) / (step - first_step) * (self.num_steps - step)


# The progress line's optional fields, in order: (metric, format). Shown when the stage reports them.
_PROGRESS_FIELDS = (('max_logit', 'max_logit {:6.1f}'), ('clipped_heads', 'clipped {:3.0f}'),
                    ('tokens_per_second', '{:9,.0f} tok/s'))


def progress_line(step: int, num_steps: int, metrics: dict[str, float], eta: float | None) -> str:
  """`step N/M  loss L  [max_logit ..  clipped ..  tok/s]  eta ..  [eval_* ..]`: the fields the stage has."""
  parts = [f'step {step:6d}/{num_steps}']
  if 'loss' in metrics:
    parts.append(f'loss {metrics["loss"]:.4f}')
  parts += [fmt.format(metrics[key]) for key, fmt in _PROGRESS_FIELDS if key in metrics]
  parts.append('eta ' + ('?' if eta is None else f'{int(eta) // 60}m{int(eta) % 60:02d}s'))
  parts += [f'{key} {value:.4f}' for key, value in metrics.items() if key.startswith('eval_')]
  return '  '.join(parts)
