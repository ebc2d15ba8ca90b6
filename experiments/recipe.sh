#!/usr/bin/env bash
# The whole K2 recipe on the embedded default, in order, on a laptop CPU: pretrain -> synthesize -> SFT -> evaluate
# (the pretrained model and the SFT'd one on the same held-out tasks) -> RL -> evaluate the RL'd model.
#
#   bash experiments/recipe.sh [ROOT [SIZE]]   # ROOT: /tmp/k2_recipe; SIZE: tiny (CPU, default) or small (one GPU)
#
# SIZE picks configs/pretrain/SIZE.gin, configs/sft/SIZE.gin and the RL config (tiny: the calculator tool domain,
# configs/rl/tiny_calculator.gin; small: arithmetic and calculator, configs/rl/small.gin). The SFT data are the
# synthesized trajectories plus arithmetic demonstrations worked column by column (RL's arithmetic needs the answer
# format; the column form is what generalizes to held-out sums, README). Every stage
# resumes where it stopped when rerun (checkpoints, synthesis shards); arguments after SIZE go to every eval_agent
# run (e.g. --tasks_per_domain 10).
set -euo pipefail
ROOT=${1:-/tmp/k2_recipe}
SIZE=${2:-tiny}
shift 2 || shift $# || true
mkdir -p "$ROOT"
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }

stage "pretrain: $SIZE on the Python standard library"
python -m experiments.pretrain --gin_file=configs/pretrain/$SIZE.gin --workdir="$ROOT/pretrain"

stage "synthesize: judged tool-use trajectories of the gym domains"
python -m experiments.synth --out "$ROOT/synth"

RL_GIN=configs/rl/tiny_calculator.gin
[ "$SIZE" = small ] && RL_GIN=configs/rl/small.gin
[ -f "$ROOT/arithmetic.jsonl" ] || python -m experiments.rl --gin_file=configs/rl/small.gin --workdir="$ROOT/rl" \
    --demonstrations_out="$ROOT/arithmetic.jsonl" --column_arithmetic

stage "SFT: the pretrained model on the accepted trajectories and the arithmetic demonstrations"
python -m experiments.sft --gin_file=configs/sft/$SIZE.gin --workdir="$ROOT/sft" \
    --gin_bindings="INIT_FROM = '$ROOT/pretrain'" \
    --gin_bindings="CONVERSATIONS = '$ROOT/synth/judged/accepted-*.jsonl,$ROOT/arithmetic.jsonl'"

stage "evaluate: held-out tasks, SFT'd vs pretrained only (bank is never in SFT)"
EVAL=(--tasks_per_domain 10 --trials 4 "$@")   # later flags win
[ "$SIZE" = small ] && EVAL=(--model_dtype bfloat16 --num_slots 256 "${EVAL[@]}")
python -m experiments.eval_agent --checkpoint "$ROOT/sft/model" --out "$ROOT/eval_sft.json" "${EVAL[@]}"
python -m experiments.eval_agent --checkpoint "$ROOT/pretrain/model" --max_positions 2048 \
    --out "$ROOT/eval_pretrained.json" "${EVAL[@]}"

stage "RL: the SFT'd model on verifiable rewards ($RL_GIN)"
python -m experiments.rl --gin_file="$RL_GIN" --workdir="$ROOT/rl" --gin_bindings="INIT_FROM = '$ROOT/sft'"
python -m experiments.eval_agent --checkpoint "$ROOT/rl/model" --out "$ROOT/eval_rl.json" "${EVAL[@]}"
stage "done"
