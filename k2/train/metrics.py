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


def progress_line(step: int, num_steps: int, metrics: dict[str, float], elapsed: float, steps_done: int) -> str:
  eta = elapsed / max(steps_done, 1) * (num_steps - step)
  line = (f'step {step:6d}/{num_steps}  loss {metrics["loss"]:.4f}  max_logit {metrics["max_logit"]:6.1f}  '
          f'clipped {metrics["clipped_heads"]:3.0f}  {metrics["tokens_per_second"]:9,.0f} tok/s  '
          f'eta {int(eta) // 60}m{int(eta) % 60:02d}s')
  if 'eval_loss' in metrics:
    line += f'  eval_loss {metrics["eval_loss"]:.4f}'
  return line
