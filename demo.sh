#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the toy world, one stage after another; the first failing
# stage stops it with that stage's error (set -e).
#
#   bash demo.sh            the full run (`make demo`): every stage with its default settings, PPO-
#                           Lagrangian, plain PPO, reward shaping at seven fixed nu, RLOO-Lagrangian and the
#                           successors, then evaluate.py over all of them; refreshes docs/results.md,
#                           docs/successors.md and README's tables
#   bash demo.sh quick      a first look in a few minutes (`make demo-quick`): shorter training,
#                           three nu; writes to runs-quick/ and results-quick/, README untouched
#   bash demo.sh smoke DIR  tiny settings for the test suite, everything under DIR
#   bash demo.sh evaluate   only stage 5 and the docs/README refresh, on the runs a full run left
#   bash demo.sh ablations  figure 6a on the runs a full run left (the full run ends with it):
#                           CM-classifier, pairwise-only cost model with nu fixed, single-dimensional
#                           annotation; win rates against SFT by the models and by the oracle;
#                           refreshes docs/ablations.md
#   bash demo.sh rloo       the critic-free stage (rloo_lagrangian.py, and plain RLOO) next to PPO-Lagrangian
#                           on the runs a full run left (every profile trains it before its evaluation);
#                           the full run refreshes docs/rloo.md
#   bash demo.sh rounds     the paper's three rounds (rounds.py) on the runs a full run left (the full
#                           run ends with it; quick and smoke run two shorter ones); refreshes docs/rounds.md
#   bash demo.sh successors the direct successors (dpo.py: DPO, SafeDPO at three Delta, MoCAN, SACPO at four
#                           beta/lambda) on the runs a full run left, then stage 5 again with them; every
#                           profile trains them before its evaluation; refreshes docs/successors.md
#   bash demo.sh main       the full profile without the ablations and the rounds, README and docs untouched
#                           (docs/successors.md's other seeds: a fresh clone, data/toy from toyworld.generate)
#
# Every training command's wall time goes to RUNS/train_times.jsonl (the successors table's time columns).
#
# Each run replaces the one an earlier demo left in its folder (--overwrite).
# README.md's and docs/' tables (between <!-- NAME:start/end --> markers) are written by tools/docs_blocks.py.
# Python is .venv's (the Makefile builds it); PY=... overrides.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
profile=${1:-full}
train=1 ablations=0 only_rounds=0 only_rloo=0 only_successors=0 extras=1 docs=1
if [ "$profile" = evaluate ]; then profile=full train=0; fi
if [ "$profile" = successors ]; then profile=full train=0 only_successors=1; fi
if [ "$profile" = main ]; then profile=full extras=0 docs=0; fi
if [ "$profile" = ablations ]; then profile=full train=0 ablations=1; fi
if [ "$profile" = rounds ]; then profile=full train=0 only_rounds=1; fi
if [ "$profile" = rloo ]; then profile=full train=0 only_rloo=1; fi

case "$profile" in
  full)
    runs=runs results=results nus="0.01 0.5 1 2 5 10 100"
    sft=() pref=() ppo=() rloo=() evalargs=(--samples_per_prompt 8) roundargs=()
    succ=() deltas="0 10 50" sacpo_lambdas="1 2 4 10" ;;
  quick)
    runs=runs-quick results=results-quick nus="0.01 1 100"
    sft=(--epochs 3) pref=(--limit 2000) ppo=(--epochs 15) rloo=(--epochs 3.75) evalargs=(--samples_per_prompt 4)
    roundargs=(--rounds 2 --draws 2 --preference_steps 60 --unified_pairs 500 --ppo_steps 40 --eval_samples 2)
    succ=(--limit 1000) deltas="10" sacpo_lambdas="2" ;;
  smoke)
    root=${2:?usage: demo.sh smoke DIR}
    runs=$root/runs results=$root/results nus="1"
    sft=(--limit 64 --epochs 1 --toy_eval_samples 8) pref=(--limit 64 --eval_limit 64)
    ppo=(--epochs 1 --limit 16 --per_device_prompt_batch_size 8 --per_device_train_batch_size 8 --max_length 48)
    rloo=(--epochs 1 --limit 16 --per_device_prompt_batch_size 2 --per_device_train_batch_size 8 --max_length 48)
    evalargs=(--limit 24 --max_new_tokens 16 --preference_limit 64)
    roundargs=(--rounds 2 --answers_per_prompt 2 --draws 2 --red_team_tries 8 --red_team_samples 2 --preference_steps 2
               --ppo_steps 1 --eval_samples 1 --max_new_tokens 16 "--preference_args=--limit 64 --eval_limit 64"
               "--ppo_args=--per_device_prompt_batch_size 16 --per_device_train_batch_size 16 --max_length 48"
               "--evaluate_args=--limit 24 --preference_limit 64")
    succ=(--limit 32 --eval_limit 16 --max_length 48 --per_device_train_batch_size 8 --mocan_prompts 4 --mocan_samples 2)
    deltas="10" sacpo_lambdas="2" ;;
  *) echo "usage: demo.sh [full|quick|smoke DIR|evaluate|ablations|rloo|rounds|successors|main]" >&2; exit 2 ;;
esac

stage() { echo; echo "==== $* ===="; }
timed() {  # timed NAME COMMAND...: run it, then append its wall time to $runs/train_times.jsonl
  local name=$1 t0; shift
  t0=$($PY -c 'import time; print(time.time())')
  "$@"
  $PY -c 'import json, sys, time; print(json.dumps({"name": sys.argv[1], "wall_s": round(time.time() - float(sys.argv[2]), 1)}))' \
    "$name" "$t0" >> "$runs/train_times.jsonl"
}

if [ "$train" = 1 ]; then
stage "toy world -> data/toy"
$PY -c "import toyworld; print(toyworld.ensure_toy_data('data/toy'))"

mkdir -p "$runs"; : > "$runs/train_times.jsonl"  # this run's training times only
stage "1/5 SFT -> $runs/sft"
timed sft $PY sft.py --overwrite --output_dir "$runs/sft" "${sft[@]}"

stage "2/5 reward model (eq. 5) -> $runs/reward"
timed reward $PY reward.py --overwrite --model_name_or_path "$runs/sft" --output_dir "$runs/reward" "${pref[@]}"

stage "3/5 cost model (eq. 6) -> $runs/cost"
timed cost $PY cost.py --overwrite --model_name_or_path "$runs/sft" --output_dir "$runs/cost" "${pref[@]}"

models=(--overwrite --actor_model_name_or_path "$runs/sft" --reward_model_name_or_path "$runs/reward"
        --cost_model_name_or_path "$runs/cost")
stage "4/5 PPO-Lagrangian (eq. 12) -> $runs/ppo_lagrangian"
timed ppo_lagrangian $PY ppo_lagrangian.py "${models[@]}" --output_dir "$runs/ppo_lagrangian" "${ppo[@]}"

stage "4/5 baseline: plain PPO (lambda fixed at 0) -> $runs/ppo"
timed ppo $PY ppo_lagrangian.py "${models[@]}" --lambda_init 0 --lambda_lr 0 --output_dir "$runs/ppo" "${ppo[@]}"
for nu in $nus; do
  stage "4/5 baseline: reward shaping R - nu*C (the paper's definition), nu = $nu -> $runs/ppo_nu$nu"
  timed "nu_$nu" $PY ppo_lagrangian.py "${models[@]}" --reward_shaping --lambda_init "$nu" --lambda_lr 0 --output_dir "$runs/ppo_nu$nu" \
    "${ppo[@]}"
done
fi

run_ablations() {  # figure 6a (section 4.2.4) on round 1's data, each a run of the stage files
  models=(--overwrite --actor_model_name_or_path "$runs/sft" --reward_model_name_or_path "$runs/reward")
  stage "figure 6a: one preference per pair (toyworld.label_single, h - c) -> data/toy/preference_single"
  $PY -c "import toyworld; toyworld.single_dimension('data/toy', 'data/toy/preference_single')"
  stage "figure 6a: CM-classifier, eq. 6's classification term only -> $runs/cost_classifier, $runs/ppo_lag_cm_classifier"
  $PY cost.py --overwrite --cost_terms classification --model_name_or_path "$runs/sft" --output_dir "$runs/cost_classifier"
  $PY ppo_lagrangian.py "${models[@]}" --cost_model_name_or_path "$runs/cost_classifier" \
    --output_dir "$runs/ppo_lag_cm_classifier" "${ppo[@]}"
  stage "figure 6a: pairwise-only cost model, lambda fixed (shaping, nu = 1) -> $runs/cost_ranking, $runs/ppo_cm_ranking"
  $PY cost.py --overwrite --cost_terms ranking --model_name_or_path "$runs/sft" --output_dir "$runs/cost_ranking"
  $PY ppo_lagrangian.py "${models[@]}" --cost_model_name_or_path "$runs/cost_ranking" --reward_shaping --lambda_init 1 \
    --lambda_lr 0 --output_dir "$runs/ppo_cm_ranking" "${ppo[@]}"
  stage "figure 6a: single-dimensional annotation, one preference model, plain PPO -> $runs/pm_single, $runs/ppo_single"
  $PY reward.py --overwrite --dataset data/toy/preference_single --model_name_or_path "$runs/sft" --output_dir "$runs/pm_single"
  $PY ppo_lagrangian.py --overwrite --actor_model_name_or_path "$runs/sft" --reward_model_name_or_path "$runs/pm_single" \
    --cost_model_name_or_path "$runs/cost" --lambda_init 0 --lambda_lr 0 --output_dir "$runs/ppo_single" "${ppo[@]}"
  stage "figure 6a: win rates against SFT, judged by R and C and by the oracle -> $results-ablations, docs/ablations.md"
  $PY evaluate.py --policies "sft=$runs/sft" "safe_rlhf=$runs/ppo_lagrangian" "reward_shaping_nu1=$runs/ppo_nu1" \
    "cm_classifier=$runs/ppo_lag_cm_classifier" "cm_pairwise_nu1=$runs/ppo_cm_ranking" "single_dim=$runs/ppo_single" \
    --arena_baseline sft --reward_model "$runs/reward" --cost_model "$runs/cost" --output_dir "$results-ablations" \
    "${evalargs[@]}"
  $PY -m tools.docs_blocks ablations "$results-ablations"
}
train_rloo() {  # rloo_lagrangian.py (four models) on round 1's models
  models=(--overwrite --actor_model_name_or_path "$runs/sft" --reward_model_name_or_path "$runs/reward"
          --cost_model_name_or_path "$runs/cost")
  stage "critic-free: RLOO-Lagrangian, leave-one-out baselines for R and C (rloo_lagrangian.py) -> $runs/rloo_lagrangian"
  timed rloo_lagrangian $PY rloo_lagrangian.py "${models[@]}" --output_dir "$runs/rloo_lagrangian" "${rloo[@]}"
  stage "critic-free baseline: plain RLOO (lambda fixed at 0) -> $runs/rloo"
  timed rloo $PY rloo_lagrangian.py "${models[@]}" --lambda_init 0 --lambda_lr 0 --output_dir "$runs/rloo" "${rloo[@]}"
}
train_successors() {  # dpo.py from the same SFT model (MoCAN: and the same reward and cost models); no sampling
  local d=(--overwrite --model_name_or_path "$runs/sft" "${succ[@]}")
  stage "successors: DPO on the helpfulness pairs (the unsafe baseline; SACPO's step 1) -> $runs/dpo"
  timed dpo $PY dpo.py --method dpo --output_dir "$runs/dpo" "${d[@]}"
  for delta in $deltas; do
    stage "successors: SafeDPO (eq. 12), pairs transformed by the safety labels, margin Delta = $delta -> $runs/safedpo_d$delta"
    timed "safedpo_d$delta" $PY dpo.py --method safedpo --safety_margin "$delta" --output_dir "$runs/safedpo_d$delta" "${d[@]}"
  done
  stage "successors: MoCAN, lambda* solved offline from samples of SFT scored by R and C, then DPO on r - lambda* c -> $runs/mocan"
  timed mocan $PY dpo.py --method mocan --reward_model_name_or_path "$runs/reward" --cost_model_name_or_path "$runs/cost" \
    --output_dir "$runs/mocan" "${d[@]}"
  for lam in $sacpo_lambdas; do
    stage "successors: SACPO's safety step from $runs/dpo, DPO on the safety pairs at beta/lambda, lambda = $lam -> $runs/sacpo_l$lam"
    timed "sacpo_l$lam" $PY dpo.py --method sacpo --sacpo_lambda "$lam" --output_dir "$runs/sacpo_l$lam" "${d[@]}" \
      --model_name_or_path "$runs/dpo"
  done
}
evaluate_rloo() {  # RLOO-Lagrangian side by side with PPO-Lagrangian (six models)
  stage "RLOO-Lagrangian next to PPO-Lagrangian: the oracle, lambda's curve, time and memory -> $results-rloo"
  $PY evaluate.py --policies "sft=$runs/sft" "ppo=$runs/ppo" "ppo_lagrangian=$runs/ppo_lagrangian" "rloo=$runs/rloo" \
    "rloo_lagrangian=$runs/rloo_lagrangian" --reward_model "$runs/reward" --cost_model "$runs/cost" \
    --output_dir "$results-rloo" "${evalargs[@]}"
  $PY evaluate.py --modes curves --training_logs "ppo_lagrangian=$runs/ppo_lagrangian" \
    "rloo_lagrangian=$runs/rloo_lagrangian" --output_dir "$results-rloo/curves"
  $PY -m tools.docs_blocks rloo "$results-rloo" --profile "$blocks"
}
run_rounds() {  # the paper's iterated Safe RLHF (section 4.1, figures 3-5) from this profile's round 1
  stage "rounds: iterated Safe RLHF from $runs (rounds.py) -> $runs/rounds, $results-rounds"
  $PY rounds.py --overwrite --runs "$runs" --output_dir "$runs/rounds" --results_dir "$results-rounds" "${roundargs[@]}"
  if [ "$blocks" = full ]; then
    $PY -m tools.docs_blocks rounds "$results-rounds"
  fi
}
blocks=$profile; [ "$docs" = 1 ] || blocks=main  # docs_blocks rewrites README and docs/ for the full profile only
if [ "$only_rloo" = 1 ]; then
  for f in sft reward cost ppo ppo_lagrangian; do
    test -f "$runs/$f/config.json" || { echo "demo.sh rloo: $runs/$f is missing; run make demo first" >&2; exit 2; }
  done
  train_rloo; evaluate_rloo
  exit 0
fi
if [ "$only_rounds" = 1 ]; then
  for f in sft reward cost ppo_lagrangian; do
    test -f "$runs/$f/config.json" || { echo "demo.sh rounds: $runs/$f is missing; run make demo first" >&2; exit 2; }
  done
  run_rounds
  exit 0
fi
if [ "$ablations" = 1 ]; then
  for f in sft reward cost ppo_lagrangian ppo_nu1; do
    test -f "$runs/$f/config.json" || { echo "demo.sh ablations: $runs/$f is missing; run make demo first" >&2; exit 2; }
  done
  run_ablations
  exit 0
fi
if [ "$only_successors" = 1 ]; then
  for f in sft reward cost ppo ppo_lagrangian rloo_lagrangian; do
    test -f "$runs/$f/config.json" || { echo "demo.sh successors: $runs/$f is missing; run make demo first" >&2; exit 2; }
  done
  train_successors
fi
if [ "$train" = 1 ]; then train_rloo; train_successors; fi

policies=("sft=$runs/sft" "ppo=$runs/ppo")
for nu in $nus; do policies+=("nu_$nu=$runs/ppo_nu$nu"); done
policies+=("ppo_lagrangian=$runs/ppo_lagrangian" "rloo_lagrangian=$runs/rloo_lagrangian" "dpo=$runs/dpo")
for delta in $deltas; do policies+=("safedpo_d$delta=$runs/safedpo_d$delta"); done
policies+=("mocan=$runs/mocan")
for lam in $sacpo_lambdas; do policies+=("sacpo_l$lam=$runs/sacpo_l$lam"); done

stage "5/5 evaluation: Safe RLHF, its baselines and its successors, one oracle -> $results"
$PY evaluate.py --policies "${policies[@]}" --reward_model "$runs/reward" --cost_model "$runs/cost" \
  --output_dir "$results" "${evalargs[@]}"

if [ "$blocks" = full ]; then
  stage "docs/results.md, README.md's headline table and the plots refreshed from $results"
  $PY -m tools.docs_blocks results "$results"
fi
stage "the successors side by side: the oracle, wall time, models held -> $results/successors.md"
$PY -m tools.docs_blocks successors "$results" --runs "$runs" --profile "$blocks"
if [ "$train" = 1 ]; then
  if [ "$profile" = full ] && [ "$extras" = 1 ]; then run_ablations; fi
  evaluate_rloo
  if [ "$extras" = 1 ]; then run_rounds; fi
fi
echo
echo "results: $results/results.md (table), $results/successors.md, $results/results.json, $results/*.png; RLOO: $results-rloo/rloo_side_by_side.md; rounds: $results-rounds/rounds.md"
