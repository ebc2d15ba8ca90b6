#!/usr/bin/env bash
# Issue 15 acceptance 5 in one `run` call of the device tool (one GPU): k2_small pretrain -> synth (+ arithmetic
# demonstrations) -> SFT -> held-out agent eval, every stage under a deadline (seconds since START, the command's
# start; PT_END, SFT_END, EV_END) so the call ends inside the 600 s limit. Run from the repo root with the wheels
# installed (see the device README). ROOT=/tmp/r stays for experiments/gpu_rl.sh (RL from $ROOT/sft) on the same
# warm machine. TOY=1: the same script at toy size on a CPU (a check of the script itself). SYNTH_TASKS: synthesized
# tasks per domain (600); DEMOS=0 leaves the arithmetic demonstrations out; PT_STEPS, SFT_STEPS: NUM_STEPS (the gins');
# EVAL_TASKS / EVAL_TRIALS: the held-out eval's tasks per domain and trials (10 / 4); COLUMNS=1: arithmetic
# demonstrations worked column by column (experiments.rl --column_arithmetic); EVAL=0 skips the eval; EXPERTS:
# routed experts (k2_small's 64 unless set; pass the same binding to gpu_rl.sh).
set -uo pipefail
START=${START:-$(date +%s)}
OUT=${OUT:-/tmp/gpu_agent_pipeline}
el() { echo $(( $(date +%s) - START )); }
left() { echo $(( $1 - $(el) )); }
PY=python3
# Compiled programs persist on the machine's disk: a later call on the same warm machine (RL after the pipeline, a
# second RL run) loads them instead of compiling again (RL's first iterations compiled for ~200 s on 2026-12-07).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
ROOT=${ROOT:-/tmp/r}
rm -rf "$ROOT"; mkdir -p "$ROOT" "$OUT"
# A stage still running 15 s before its deadline prints every thread's stack (`kill -USR1`, experiments.pretrain.
# announce) before it is stopped: on 2026-12-07 an SFT went silent after step 150 on an H100 until killed. GPU use is
# logged every 20 s to $OUT/gpu_monitor.log.
stacks_before() { (sleep $(( $(left $1) - 15 )) && pkill -USR1 -f "^[^ ]*python[0-9.]* -m $2 ") & DUMPER=$!; }  # not `timeout`
(while sleep 20; do echo "$(el)s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>&1)"
 done) > "$OUT/gpu_monitor.log" 2>&1 &
MONITOR=$!
trap 'kill $MONITOR 2>/dev/null' EXIT
PT=(); SF=(); EV=(--tasks_per_domain ${EVAL_TASKS:-10} --trials ${EVAL_TRIALS:-4} --num_slots 256 --model_dtype bfloat16)
[ -n "${PT_STEPS:-}" ] && PT=(--gin_bindings="NUM_STEPS = $PT_STEPS")
[ -n "${SFT_STEPS:-}" ] && SF=(--gin_bindings="NUM_STEPS = $SFT_STEPS")
if [ -n "${EXPERTS:-}" ]; then   # routed experts of k2_small (64): 16 makes it 341M total, 168M activated
  PT+=(--gin_bindings="model_config.num_experts = $EXPERTS"); SF+=(--gin_bindings="model_config.num_experts = $EXPERTS")
fi
if [ "${TOY:-0}" = 1 ]; then
  M=(--gin_bindings="model_config.hidden_size = 128" --gin_bindings="model_config.num_layers = 2"
     --gin_bindings="model_config.num_experts = 8" --gin_bindings="model_config.expert_intermediate_size = 64"
     --gin_bindings="model_config.dense_intermediate_size = 256" --gin_bindings="model_config.num_heads = 4")
  PT=("${M[@]}" --gin_bindings="NUM_STEPS = ${TOY_PT_STEPS:-2}" --gin_bindings="BATCH_SIZE = 2" --gin_bindings="SEQ_LEN = 128")
  SF=("${M[@]}" --gin_bindings="NUM_STEPS = 2" --gin_bindings="BATCH_SIZE = 1")
  EV=(--domains calculator --tasks_per_domain 1 --trials 2 --num_slots 4 --max_new_tokens 16)
fi
echo "root $ROOT; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tail -1
df -h /tmp /dev/shm | tail -2

(export JAX_PLATFORMS=cpu
 $PY -m experiments.synth --out "$ROOT/synth" --tasks_per_domain ${SYNTH_TASKS:-600} > "$ROOT/synth.log" 2>&1
 echo "synth rc $? at $(el)s"
 [ "${DEMOS:-1}" = 0 ] && exit
 $PY -m experiments.rl --gin_file=configs/rl/small.gin --workdir=/tmp/unused \
     --demonstrations_out="$ROOT/synth/judged/accepted-arithmetic.jsonl" $([ "${COLUMNS:-0}" = 1 ] && echo --column_arithmetic) \
     > "$ROOT/demos.log" 2>&1; echo "demonstrations rc $? at $(el)s: $(tail -1 "$ROOT/demos.log")") &
SYNTH=$!
echo "=== pretrain at $(el)s"
stacks_before ${PT_END:-320} experiments.pretrain
timeout -s TERM -k 20 "$(left ${PT_END:-320})" $PY -m experiments.pretrain --gin_file=configs/pretrain/small.gin \
    --workdir="$ROOT/pretrain" --gin_bindings="CHECKPOINT_EVERY = 400" --gin_bindings="train.sample_tokens = 0" \
    "${PT[@]}"
echo "pretrain rc $? at $(el)s"
kill $DUMPER 2>/dev/null
wait $SYNTH; grep -A3 '"accepted"' "$ROOT/synth.log" | head -4; grep '"seconds"' "$ROOT/synth.log"
TOK=()
if [ ! -d "$ROOT/pretrain/model" ]; then   # preempted: no export, so name the cached tokenizer
  TOK=(--gin_bindings="sft.tokenizer_path = '$(ls $HOME/.cache/k2/tokenizers/bpe_4096_*.json | head -1)'")
fi
echo "=== sft at $(el)s"
stacks_before ${SFT_END:-500} experiments.sft
timeout -s TERM -k 10 "$(left ${SFT_END:-500})" $PY -m experiments.sft --gin_file=configs/sft/small.gin --workdir="$ROOT/sft" \
    --gin_bindings="INIT_FROM = '$ROOT/pretrain'" \
    --gin_bindings="CONVERSATIONS = '$ROOT/synth/judged/accepted-*.jsonl'" "${TOK[@]}" "${SF[@]}"
echo "sft rc $? at $(el)s"
kill $DUMPER 2>/dev/null
cp "$ROOT/pretrain/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"; cp "$ROOT/sft/metrics.jsonl" "$OUT/sft_metrics.jsonl"
cp "$ROOT/synth/manifest.json" "$OUT/synth_manifest.json"; cp "$ROOT/synth.log" "$ROOT/demos.log" "$OUT/"
wc -l "$ROOT"/synth/judged/accepted-*.jsonl
if [ "${TOY:-0}" != 1 ] && [ "$(left ${EV_END:-585})" -lt ${EV_FULL_S:-170} ]; then EV=(--tasks_per_domain 10 --trials 2 --num_slots 256 --model_dtype bfloat16); fi
[ "${EVAL:-1}" = 0 ] && exit 0
echo "eval flags ${EV[*]}"
echo "=== eval at $(el)s"
timeout -s TERM -k 5 "$(left ${EV_END:-585})" $PY -m experiments.eval_agent --checkpoint "$ROOT/sft/model" \
    --out "$OUT/eval_sft.json" "${EV[@]}"
echo "eval rc $? at $(el)s"
