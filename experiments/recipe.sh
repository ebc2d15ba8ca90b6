#!/usr/bin/env bash
# The whole K2 recipe on the embedded default, in order, on a laptop CPU: pretrain -> synthesize -> SFT -> evaluate
# (the pretrained model and the SFT'd one on the same held-out tasks).
#
#   bash experiments/recipe.sh [ROOT [SIZE]]   # ROOT: /tmp/k2_recipe; SIZE: tiny (CPU, default) or small (one GPU)
#
# SIZE picks configs/pretrain/SIZE.gin and configs/sft/SIZE.gin. Every stage resumes where it stopped when rerun
# (checkpoints, synthesis shards); arguments after SIZE go to every eval_agent run (e.g. --tasks_per_domain 10).
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

stage "SFT: the pretrained model on the accepted trajectories"
python -m experiments.sft --gin_file=configs/sft/$SIZE.gin --workdir="$ROOT/sft" \
    --gin_bindings="INIT_FROM = '$ROOT/pretrain'" \
    --gin_bindings="CONVERSATIONS = '$ROOT/synth/judged/accepted-*.jsonl'"

stage "evaluate: held-out tasks, SFT'd vs pretrained only (bank is never in SFT)"
EVAL=(--tasks_per_domain 10 --trials 4 "$@")   # later flags win
python -m experiments.eval_agent --checkpoint "$ROOT/sft/model" --out "$ROOT/eval_sft.json" "${EVAL[@]}"
python -m experiments.eval_agent --checkpoint "$ROOT/pretrain/model" --max_positions 2048 \
    --out "$ROOT/eval_pretrained.json" "${EVAL[@]}"
stage "done"
