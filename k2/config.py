"""Model configurations: one frozen dataclass per component, composed into `ModelConfig`.

The architecture (MLAConfig, MoEConfig, RopeConfig and ModelConfig's own fields) says what a checkpoint stores;
`RuntimeConfig` says how the model computes (kernels, rematerialization, compute dtype), so a checkpoint restores
under any runtime.

Named variants (`k2_full`, `k2_small`, `k2_tiny`) live in `VARIANTS`; `get_config(name)` returns one. Numbers for
`k2_full` are `shared/K2_REFERENCE.md` section 1 (the Kimi K2 technical report, arXiv 2507.20534).
"""

from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
  """A configuration that cannot describe a valid model; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  """YaRN RoPE extension (Peng et al. 2023) as DeepSeek-V3 / K2 configure it.

  factor: context extension ratio (K2: 32, from 4096 to 131072).
  mscale, mscale_all_dim: YaRN attention-scale correction. The softmax scale is multiplied by
    mscale(factor, mscale_all_dim)**2 and cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
  """
  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Decoupled RoPE applied to the qk_rope_head_dim slice of queries and the shared rope key."""
  head_dim: int
  theta: float
  max_position_embeddings: int
  yarn: YarnConfig | None = None


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Multi-head latent attention (DeepSeek-V2 section 2.1). q_lora_rank None means a plain q projection."""
  hidden_size: int
  num_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Routed + shared experts with a sigmoid router and aux-loss-free bias (DeepSeek-V3 section 2.1.2)."""
  hidden_size: int
  num_experts: int
  num_experts_per_token: int
  num_shared_experts: int
  expert_intermediate_size: int
  routed_scaling_factor: float
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  balance_loss_weight: float = 0.0  # sequence-wise balance loss (DeepSeek-V3 eq. 17-20); off by default


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the model computes, not what it stores: a checkpoint restores under any of these (resume with another
  kernel choice). Each layer gets the switches it uses as constructor arguments."""
  # Compute dtype (activations, matmul inputs); parameters are stored in ModelConfig.param_dtype.
  dtype: str = 'bfloat16'
  # 'reference' materializes the logits (k2.attention.attention_reference); 'flash' is the Pallas kernel in
  # pallas_kernels/flash_attention; 'auto' picks flash on GPU/TPU and reference on CPU.
  attention_impl: str = 'auto'
  # 'ragged_dot' is jax.lax.ragged_dot; 'pallas' is pallas_kernels/grouped_matmul; 'auto' picks pallas on GPU/TPU.
  matmul_impl: str = 'auto'
  # Expert parallelism (a mesh with an 'expert' axis > 1, k2.moe.expert_parallel): 'ragged' is dropless
  # (jax.lax.ragged_all_to_all), 'capacity' sends at most ep_capacity_factor * tokens * K / ep token copies to each
  # expert shard and drops the rest (counted in aux['dropped_tokens']); 'auto' is dropless: ragged on GPU/TPU, and
  # on CPU (XLA:CPU has no ragged all-to-all) capacity with buffers that hold every copy.
  ep_impl: str = 'auto'
  ep_capacity_factor: float = 1.25
  # Activation rematerialization per decoder layer: 'none', 'full' (recompute everything in the backward pass),
  # or 'dots' (keep matmul outputs, recompute norms and elementwise ops; K2 recomputes selectively, report 3).
  remat_policy: str = 'none'


# ModelConfig's components; `ModelConfig.replace` takes their fields by name.
COMPONENTS = ('runtime', 'attention', 'moe', 'rope')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole K2-family decoder: the architecture (`param_dtype` is the storage dtype) and its `runtime`."""
  vocab_size: int
  num_layers: int
  first_k_dense: int
  dense_intermediate_size: int
  attention: MLAConfig
  moe: MoEConfig
  rope: RopeConfig
  rms_norm_eps: float = 1e-6  # every RMSNorm: the layers', the final one and MLA's latent norms
  param_dtype: str = 'float32'
  runtime: RuntimeConfig = RuntimeConfig()

  def __post_init__(self):
    validate(self)

  @property
  def hidden_size(self) -> int:
    return self.attention.hidden_size

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense

  def architecture(self) -> dict:
    """The fields that say what a checkpoint stores (everything but `runtime`), as nested dicts."""
    fields = dataclasses.asdict(self)
    del fields['runtime']
    return fields

  def replace(self, **changes) -> 'ModelConfig':
    """A copy with fields changed by name: a component (attention=MLAConfig(...)), a top-level field
    (param_dtype='bfloat16') or a field of a component (attention_impl='flash' sets runtime.attention_impl,
    num_experts=16 sets moe.num_experts; hidden_size sets it in attention and moe). Gin's
    `model_config.attention_impl = ...` and `get_config(name, attention_impl=...)` come here."""
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    nested: dict[str, dict] = {}
    for key, value in changes.items():
      if key in top:
        continue
      owners = [part for part in COMPONENTS if key in {f.name for f in dataclasses.fields(getattr(self, part))}]
      if not owners:
        raise ConfigError(f'unknown model config field {key!r}')
      for part in owners:
        nested.setdefault(part, {})[key] = value
    fields = {key: value for key, value in changes.items() if key in top}
    fields.update({part: dataclasses.replace(fields.get(part, getattr(self, part)), **values)
                   for part, values in nested.items()})
    return dataclasses.replace(self, **fields)


def validate(config: ModelConfig) -> None:
  """Raises ConfigError naming the first inconsistency in `config`."""
  att, moe, rope, runtime = config.attention, config.moe, config.rope, config.runtime
  positive = {
      'vocab_size': config.vocab_size, 'num_layers': config.num_layers,
      'hidden_size': att.hidden_size, 'num_heads': att.num_heads, 'kv_lora_rank': att.kv_lora_rank,
      'qk_nope_head_dim': att.qk_nope_head_dim, 'qk_rope_head_dim': att.qk_rope_head_dim,
      'v_head_dim': att.v_head_dim, 'num_experts': moe.num_experts,
      'num_experts_per_token': moe.num_experts_per_token, 'expert_intermediate_size': moe.expert_intermediate_size,
      'max_position_embeddings': rope.max_position_embeddings, 'n_group': moe.n_group, 'topk_group': moe.topk_group,
  }
  for name, value in positive.items():
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f'{name} must be a positive integer, got {value!r}')
  if att.q_lora_rank is not None and att.q_lora_rank <= 0:
    raise ConfigError(f'q_lora_rank must be a positive integer or None, got {att.q_lora_rank!r}')
  if not 0 <= config.first_k_dense <= config.num_layers:
    raise ConfigError(f'first_k_dense={config.first_k_dense} must lie in [0, num_layers={config.num_layers}]')
  if config.first_k_dense > 0 and config.dense_intermediate_size <= 0:
    raise ConfigError(f'dense_intermediate_size must be positive, got {config.dense_intermediate_size}')
  if att.qk_rope_head_dim % 2:
    raise ConfigError(f'qk_rope_head_dim={att.qk_rope_head_dim} must be even (RoPE rotates pairs)')
  if rope.head_dim != att.qk_rope_head_dim:
    raise ConfigError(f'rope.head_dim={rope.head_dim} != attention.qk_rope_head_dim={att.qk_rope_head_dim}')
  if moe.hidden_size != att.hidden_size:
    raise ConfigError(f'moe.hidden_size={moe.hidden_size} != attention.hidden_size={att.hidden_size}')
  if moe.num_experts_per_token > moe.num_experts:
    raise ConfigError(f'num_experts_per_token={moe.num_experts_per_token} exceeds num_experts={moe.num_experts}')
  if moe.num_experts % moe.n_group:
    raise ConfigError(f'num_experts={moe.num_experts} is not divisible by n_group={moe.n_group}')
  if moe.topk_group > moe.n_group:
    raise ConfigError(f'topk_group={moe.topk_group} exceeds n_group={moe.n_group}')
  if moe.n_group > 1 and moe.num_experts // moe.n_group < 2:
    raise ConfigError('group-limited routing needs at least 2 experts per group')
  if moe.n_group > 1 and moe.topk_group * (moe.num_experts // moe.n_group) < moe.num_experts_per_token:
    raise ConfigError(f'topk_group={moe.topk_group} groups of {moe.num_experts // moe.n_group} experts cannot '
                      f'hold num_experts_per_token={moe.num_experts_per_token}')
  if runtime.attention_impl not in ('auto', 'reference', 'flash'):
    raise ConfigError(f"attention_impl must be 'auto', 'reference' or 'flash', got {runtime.attention_impl!r}")
  if runtime.matmul_impl not in ('auto', 'ragged_dot', 'pallas'):
    raise ConfigError(f"matmul_impl must be 'auto', 'ragged_dot' or 'pallas', got {runtime.matmul_impl!r}")
  if runtime.ep_impl not in ('auto', 'ragged', 'capacity'):
    raise ConfigError(f"ep_impl must be 'auto', 'ragged' or 'capacity', got {runtime.ep_impl!r}")
  if not runtime.ep_capacity_factor > 0:
    raise ConfigError(f'ep_capacity_factor must be positive, got {runtime.ep_capacity_factor!r}')
  if runtime.remat_policy not in ('none', 'full', 'dots'):
    raise ConfigError(f"remat_policy must be 'none', 'full' or 'dots', got {runtime.remat_policy!r}")
  for name, value in (('dtype', runtime.dtype), ('param_dtype', config.param_dtype)):
    if value not in ('float32', 'bfloat16', 'float16'):
      raise ConfigError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {value!r}")
  if rope.yarn is not None and rope.yarn.factor <= 0:
    raise ConfigError(f'yarn factor must be positive, got {rope.yarn.factor}')


def make_config(*, vocab_size: int, hidden_size: int, num_layers: int, first_k_dense: int,
                dense_intermediate_size: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, num_experts: int,
                num_experts_per_token: int, num_shared_experts: int, expert_intermediate_size: int,
                routed_scaling_factor: float, rope_theta: float, max_position_embeddings: int,
                yarn: YarnConfig | None = None, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                rms_norm_eps: float = 1e-6, balance_loss_weight: float = 0.0, param_dtype: str = 'float32',
                runtime: RuntimeConfig = RuntimeConfig()) -> ModelConfig:
  """Builds a ModelConfig from flat architecture fields (the shape a checkpoint's config.json has)."""
  return ModelConfig(
      vocab_size=vocab_size, num_layers=num_layers, first_k_dense=first_k_dense,
      dense_intermediate_size=dense_intermediate_size, rms_norm_eps=rms_norm_eps, param_dtype=param_dtype,
      runtime=runtime,
      attention=MLAConfig(
          hidden_size=hidden_size, num_heads=num_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
          qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim),
      moe=MoEConfig(
          hidden_size=hidden_size, num_experts=num_experts, num_experts_per_token=num_experts_per_token,
          num_shared_experts=num_shared_experts, expert_intermediate_size=expert_intermediate_size,
          routed_scaling_factor=routed_scaling_factor, n_group=n_group, topk_group=topk_group,
          norm_topk_prob=norm_topk_prob, balance_loss_weight=balance_loss_weight),
      rope=RopeConfig(head_dim=qk_rope_head_dim, theta=rope_theta,
                      max_position_embeddings=max_position_embeddings, yarn=yarn),
  )


K2_YARN = YarnConfig(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0, beta_slow=1.0,
                     mscale=1.0, mscale_all_dim=1.0)


def k2_full() -> ModelConfig:
  """Exactly Kimi K2: 1.04T total, 32.6B activated parameters."""
  return make_config(
      vocab_size=163840, hidden_size=7168, num_layers=61, first_k_dense=1, dense_intermediate_size=18432,
      num_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, num_experts=384, num_experts_per_token=8, num_shared_experts=1,
      expert_intermediate_size=2048, routed_scaling_factor=2.827, rope_theta=50000.0,
      max_position_embeddings=131072, yarn=K2_YARN)


def k2_small() -> ModelConfig:
  """K2-shaped (MLA, 1 dense layer then sigmoid-routed MoE with a shared expert), ~2B total, for one H200."""
  return make_config(
      vocab_size=163840, hidden_size=1024, num_layers=12, first_k_dense=1, dense_intermediate_size=2816,
      num_heads=16, q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
      v_head_dim=64, num_experts=64, num_experts_per_token=6, num_shared_experts=1,
      expert_intermediate_size=512, routed_scaling_factor=2.827, rope_theta=50000.0,
      max_position_embeddings=4096)


def k2_tiny() -> ModelConfig:
  """A few million parameters: trains on a laptop CPU in minutes; every K2 mechanism is present."""
  return make_config(
      vocab_size=4096, hidden_size=128, num_layers=4, first_k_dense=1, dense_intermediate_size=384,
      num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
      v_head_dim=32, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
      expert_intermediate_size=96, routed_scaling_factor=2.827, rope_theta=50000.0,
      max_position_embeddings=1024, runtime=RuntimeConfig(dtype='float32'))


VARIANTS = {'k2_full': k2_full, 'k2_small': k2_small, 'k2_tiny': k2_tiny}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the named variant with field overrides by name (`ModelConfig.replace`: dtype='float32' sets
  runtime.dtype, num_experts=16 sets moe.num_experts)."""
  if name not in VARIANTS:
    raise ConfigError(f'unknown model {name!r}; known models: {", ".join(sorted(VARIANTS))}')
  config = VARIANTS[name]()
  return config.replace(**overrides) if overrides else config


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (YaRN eq. 22 as DeepSeek parameterizes it)."""
  if factor <= 1 or not mscale:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0
