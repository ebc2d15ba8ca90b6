"""Self-critique rubric reward (K2 report 3.2.2, appendix F): the policy, prompted as a critic, compares two of its
own responses against core, prescriptive and task-specific rubrics; the comparisons become rewards.

    critic = Critic(tokenizer)
    win_rates, agreement = critic.judge(model, episodes, prompts)   # [P, K] in [0, 1]; agreement or None

For each pair (i, j) of a prompt's K responses the critic prompt shows both (as A and B) and the critic's preference
is read off its next-token distribution: P(A better) = sigmoid(log p('A') - log p('B')), one forward per prompt,
no sampling. Each pair is judged in both orders and averaged, which cancels a preference for a position. A
response's reward is its mean probability of beating the group's other responses (a Bradley-Terry-style win rate).
On verifiable prompts, `agreement` is the share of pairs with different verifiable rewards where the critic prefers
the better one: the measurement that closes K2's loop (a critic that agrees with the verifier more can be trusted on
prompts without one). The trainer adds critic_weight * win rate to the reward.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2 import chat
from k2.rl import tasks as tasks_lib

CORE_RUBRICS = (
    'Clarity and relevance: the response answers exactly what was asked, concisely, without filler.',
    'Conversational fluency: the response reads naturally and keeps to the task.',
    'Objective, grounded interaction: claims are correct and supported, with no invented facts.',
)
PRESCRIPTIVE_RUBRICS = (
    'No opening praise of the question or the user.',
    'No self-justification or statements about how good the response is.',
)
CHOICES = ('A', 'B')


def critic_messages(question: str, task_rubric: str, first: str, second: str) -> list[chat.Message]:
  """The critic's prompt: the rubrics, the question and two responses; it answers with one letter."""
  rubrics = '\n'.join(f'- {r}' for r in (*CORE_RUBRICS, *PRESCRIPTIVE_RUBRICS, *([task_rubric] if task_rubric else
                                                                                 [])))
  return [chat.Message('user', f'Judge two responses to a question against these rubrics:\n{rubrics}\n\n'
                               f'Question: {question}\n\nResponse A:\n{first}\n\nResponse B:\n{second}\n\n'
                               'Which response is better? Reply with A or B.')]


@functools.partial(jax.jit, static_argnums=0)
def _choice_logprobs(graphdef, state, tokens, lengths, choice_ids):
  """log p(choice) of the next token after each prompt: tokens [N, W] right-padded, lengths [N] -> [N, 2]."""
  logits, _ = nnx.merge(graphdef, state)(tokens)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return jax.nn.log_softmax(last, axis=-1)[:, choice_ids]


class Critic:
  """The policy as a pairwise rubric critic (see the module docstring)."""

  def __init__(self, tokenizer: chat.Tokenizer):
    self.tokenizer = tokenizer
    self.choice_ids = np.asarray([tokenizer.encode(c)[0] for c in CHOICES], np.int32)

  def prefer_first(self, model, pairs: Sequence[tuple[str, str, str, str]]) -> np.ndarray:
    """P(first better) [N] for (question, task rubric, first, second) tuples, from the model's next token."""
    rendered = [chat.render(critic_messages(*pair), self.tokenizer, add_generation_prompt=True).tokens
                for pair in pairs]
    lengths = np.asarray([len(r) for r in rendered], np.int32)
    width = 1 << int(lengths.max() - 1).bit_length()  # powers of two: few compiled shapes
    tokens = np.zeros((len(rendered), width), np.int32)
    for row, ids in enumerate(rendered):
      tokens[row, :len(ids)] = ids
    graphdef, state = nnx.split(model)
    logprobs = np.asarray(jax.device_get(_choice_logprobs(graphdef, state, tokens, lengths, self.choice_ids)))
    return 1.0 / (1.0 + np.exp(logprobs[:, 1] - logprobs[:, 0]))

  def judge(self, model, episodes, prompts) -> tuple[np.ndarray, float | None]:
    """(win rates [P, K], agreement with episodes.rewards or None when no pair's verifiable rewards differ)."""
    num_prompts, k = episodes.rewards.shape
    texts = [[tasks_lib.response_text(r, self.tokenizer) for r in group] for group in episodes.tokens]
    index = [(p, i, j) for p in range(num_prompts) for i, j in itertools.combinations(range(k), 2)]
    pairs = []
    for p, i, j in index:
      prompt = prompts[episodes.prompt_ids[p]]
      pairs += [(prompt.question, prompt.rubric, texts[p][i], texts[p][j]),
                (prompt.question, prompt.rubric, texts[p][j], texts[p][i])]
    first = self.prefer_first(model, pairs)
    beats = (first[0::2] + 1.0 - first[1::2]) / 2  # P(i beats j), both orders
    wins = np.zeros((num_prompts, k))
    agree = []
    for (p, i, j), b in zip(index, beats):
      wins[p, i] += b
      wins[p, j] += 1.0 - b
      r_i, r_j = episodes.rewards[p, i], episodes.rewards[p, j]
      if r_i != r_j:
        agree.append((b > 0.5) == (r_i > r_j))
    return wins / (k - 1), (float(np.mean(agree)) if agree else None)
