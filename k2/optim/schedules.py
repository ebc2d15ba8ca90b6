"""Learning-rate schedules.

K2 pre-training (K2 report section 3) uses warmup-stable-decay (WSD): 500 warm-up steps, lr 2e-4 held for 10T tokens,
then a cosine decay to 2e-5 over 5.5T tokens. At 67M tokens per global batch that is about 149k stable steps and
82k decay steps: `wsd_schedule(2e-4, 500, 149_000, 82_000, 2e-5)`. AdamW and Muon parameters share the schedule.
"""

import math

import jax.numpy as jnp
import optax


def wsd_schedule(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    end_value: float,
    init_value: float = 0.0,
) -> optax.Schedule:
  """Warmup-stable-decay: linear warm-up, constant peak, cosine decay to a floor, then the floor for ever.

  value(step) =
    init + (peak - init) * step / warmup                                  for step < warmup
    peak                                                                  up to warmup + stable
    end + (peak - end) * (1 + cos(pi * t)) / 2,  t = (step - warmup - stable) / decay   over the decay
    end                                                                   after warmup + stable + decay

  Args:
    peak_value: value after warm-up and during the stable phase.
    warmup_steps: steps of the linear warm-up from `init_value` (0 skips it).
    stable_steps: steps held at `peak_value`.
    decay_steps: steps of the cosine decay (0 drops straight to `end_value`).
    end_value: floor reached at the end of the decay and held afterwards.
    init_value: value at step 0.

  Returns:
    schedule(step) -> [] float32; jit friendly (no Python branching on the step).
  """
  decay_start = warmup_steps + stable_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup_value = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
    decay_fraction = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    cosine_value = end_value + (peak_value - end_value) * 0.5 * (1.0 + jnp.cos(math.pi * decay_fraction))
    return jnp.where(step < warmup_steps, warmup_value, cosine_value)

  return schedule
