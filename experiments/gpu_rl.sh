#!/usr/bin/env bash
# Issue 16 acceptance 5 on the machine experiments/gpu_agent_pipeline.sh left warm: RL of its SFT'd k2_small
# ($ROOT/sft) on arithmetic word problems and the calculator tool domain (configs/rl/small.gin), killed by RL_END
# (~580 s from START, the command's start) if it has not finished: SIGTERM RL_GRACE (30) s before RL_END, so it saves
# the iteration in flight when that ends in time (RESUME=1 in a later call on the same warm machine goes on from it),
# then SIGKILL at RL_END; metrics.jsonl is written per iteration, so a killed run keeps its records. Run from the repo root; arguments go to experiments.rl (e.g. --gin_bindings).
# COMPARE_LEVELS=1,2,3: then, inside the same deadline, experiments.rl_compare of the SFT'd and the RL'd model on
# held-out arithmetic of those levels (COMPARE_PROMPTS per level, 8 samples, budget COMPARE_BUDGET).
# COMPARE_TOOL=1: after it, the same paired comparison on held-out calculator episodes (64 tasks x 4, T 0.3, a draw
# (seed 1) apart from RL's own held-out set).
# TOY=1: toy model and sizes on a CPU (a check of the script itself).
set -uo pipefail
START=${START:-$(date +%s)}
OUT=${OUT:-/tmp/gpu_rl}
el() { echo $(( $(date +%s) - START )); }
left() { echo $(( $1 - $(el) )); }
PY=python3
# Compiled programs persist on the machine's disk: a later call on the same warm machine (RL after the pipeline, a
# second RL run) loads them instead of compiling again (RL's first iterations compiled for ~200 s on 2026-12-07).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
ROOT=${ROOT:-/tmp/r}
mkdir -p "$OUT"
echo "root $ROOT; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
if [ ! -d "$ROOT/sft/model" ]; then
  echo "no $ROOT/sft/model: call A's SFT'd model is not on this machine (not the warm one); nothing to do"; ls -la "$ROOT" 2>&1
  exit 3
fi
RL=(--gin_bindings="rl.checkpoint_every = 100")
if [ "${TOY:-0}" = 1 ]; then
  RL+=(--gin_bindings="model_config.hidden_size = 128" --gin_bindings="model_config.num_layers = 2"
      --gin_bindings="model_config.num_experts = 8" --gin_bindings="model_config.expert_intermediate_size = 64"
      --gin_bindings="model_config.dense_intermediate_size = 256" --gin_bindings="model_config.num_heads = 4"
      --gin_bindings="NUM_ITERATIONS = 1" --gin_bindings="rl.num_train_prompts = 8" --gin_bindings="rl.num_eval_prompts = 2"
      --gin_bindings="rl.eval_samples = 2" --gin_bindings="RLConfig.prompts_per_iteration = 2"
      --gin_bindings="RLConfig.samples_per_prompt = 2" --gin_bindings="RLConfig.num_slots = 8")
fi
[ "${RESUME:-0}" = 1 ] || rm -rf "$ROOT/rl"
echo "=== rl at $(el)s"
(sleep $(( $(left ${RL_END:-580}) - ${RL_GRACE:-30} - 10 )) && pkill -USR1 -f "^[^ ]*python[0-9.]* -m experiments.rl ") &  # stacks if still running
DUMPER=$!
timeout -s TERM -k ${RL_GRACE:-30} "$(left $(( ${RL_END:-580} - ${RL_GRACE:-30} )))" $PY -m experiments.rl --gin_file=configs/rl/small.gin --workdir="$ROOT/rl" \
    --gin_bindings="INIT_FROM = '$ROOT/sft'" "${RL[@]}" "$@" 2>&1 | tee "$OUT/rl.log"
echo "rl rc $? at $(el)s"
kill $DUMPER 2>/dev/null
cp "$ROOT/rl/metrics.jsonl" "$OUT/rl_metrics.jsonl"; cp "$ROOT/rl/operative_config.gin" "$OUT/" 2>/dev/null
wc -l "$OUT/rl_metrics.jsonl"
if [ -n "${COMPARE_LEVELS:-}" ] && [ -d "$ROOT/rl/model" ] && [ "$(left ${RL_END:-580})" -gt 20 ]; then
  echo "=== rl_compare (arithmetic levels $COMPARE_LEVELS) at $(el)s"
  timeout -s KILL "$(left ${RL_END:-580})" $PY -m experiments.rl_compare --before "$ROOT/sft/model" \
      --after "$ROOT/rl/model" --domain arithmetic --level "$COMPARE_LEVELS" --budget ${COMPARE_BUDGET:-96} \
      --prompts ${COMPARE_PROMPTS:-256} --samples 8 2>&1 | grep -v Warn | tee "$OUT/rl_compare.txt"
  echo "rl_compare rc $? at $(el)s"
fi
if [ "${COMPARE_TOOL:-0}" = 1 ] && [ -d "$ROOT/rl/model" ] && [ "$(left ${RL_END:-580})" -gt 20 ]; then
  echo "=== rl_compare (calculator episodes) at $(el)s"
  timeout -s KILL "$(left ${RL_END:-580})" $PY -m experiments.rl_compare --before "$ROOT/sft/model" \
      --after "$ROOT/rl/model" --domain calculator --prompts 64 --samples 4 --temperature 0.3 --seed 1 2>&1 \
      | grep -v Warn | tee "$OUT/rl_compare_calculator.txt"
  echo "rl_compare rc $? at $(el)s"
fi
