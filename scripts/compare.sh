#!/usr/bin/env bash
# Re-derive the README's rate-distortion comparison in one command:
#
#   bash scripts/compare.sh DATA_DIR [EPOCHS] [SET] [--key=value ...]   # e.g. DATA_DIR=/tmp/patches from scripts/make_patches.py
#
# Any --key=value after SET goes to every train.py run (e.g. --rotate=False, the recipe the README's
# tables measured before quarter turns were the default).
# SET "bottlenecks" (the default): every bottleneck setting of the README's table. SET "priors":
# the learned entropy model against the fitted prior and DDCL's surrogate (README, "Learned
# entropy model"): rate_weight sweeps of FSQ and DDCL with entropy_model=learned and with
# entropy_model=context, DDCL's comm-weight sweep with the surrogate (and each of those runs again
# with a context prior fitted after training, scripts/fit_context_prior.py), VQ with a learned prior, FSQ and VQ with the fitted one.
#
# Trains every setting of the set with train.py's defaults for EPOCHS epochs
# (default 30) on DATA_DIR/train, evaluates every run's checkpoint of epoch 10, 20, ... (to show
# where the ranking settles), then all best checkpoints together on DATA_DIR/test: the tables go
# to stdout, the plots and JSON to compare/outputs/ (compare/outputs/epoch_N/ for the earlier ones). A run that an earlier
# call left unfinished is resumed from its last checkpoint, and a finished one is not trained again.
set -euo pipefail
data_dir=${1:?usage: bash scripts/compare.sh DATA_DIR [EPOCHS] [bottlenecks|priors] [--key=value ...]}
epochs=${2:-30}
set_name=${3:-bottlenecks}
extra=("${@:4}")
out=${COMPARE_DIR:-compare}
cd "$(dirname "$0")/.."
common=(--dataset=folder --data_dir="$data_dir" --epochs="$epochs" --output_dir="$out/outputs"
        --checkpoint_dir="$out/checkpoints" --checkpoint_every=10 "${extra[@]}")

run() {  # run NAME ARGS...: train NAME for EPOCHS epochs, resuming what an earlier call left unfinished
  local name=$1; shift
  local last="$out/checkpoints/${name}_vae_last.pt" resume=()
  [ -f "$last" ] && resume=(--resume="$last")
  python train.py "${common[@]}" --run_name="$name" "$@" "${resume[@]}" > "$out/${name}.log"
  tail -n 1 "$out/${name}.log"
}

mkdir -p "$out"
case "$set_name" in
  bottlenecks)
    for levels in "[8,6,5]" "[8,5,5,5]" "[7,5,5,5,5]"; do
      run "fsq_$(echo "$levels" | tr -d '[] ' | tr , -)" --quantizer=fsq --fsq_levels="$levels"
    done
    for w in 3e-3 1e-3 3e-4; do
      run "ddcl_w$w" --quantizer=ddcl --ddcl_comm_weight="$w"
    done
    run vq_1024 --quantizer=vq
    run none --quantizer=none
    run vae --quantizer=vae ;;
  priors)
    run fsq_8-6-6-5 --quantizer=fsq  # the fitted-prior references
    run vq_1024 --quantizer=vq
    for w in 1e-2 7e-3 5e-3 3e-3 2e-3 1.5e-3 1e-3 3e-4; do
      run "ddcl_w$w" --quantizer=ddcl --ddcl_comm_weight="$w"
    done
    for rw in 0.3 0.1 0.07 0.05 0.03 0.02 0.015 0.01; do
      run "ddcl_learned_rw$rw" --quantizer=ddcl --entropy_model=learned --rate_weight="$rw"
    done
    for rw in 0.1 0.07 0.05 0.03 0.02 0.015 0.01 0.007; do
      run "ddcl_context_rw$rw" --quantizer=ddcl --entropy_model=context --rate_weight="$rw"
    done
    for rw in 0.3 0.1 0.03 0; do
      run "fsq_learned_rw$rw" --quantizer=fsq --entropy_model=learned --rate_weight="$rw"
    done
    for rw in 0.3 0.1 0.03 0; do
      run "fsq_context_rw$rw" --quantizer=fsq --entropy_model=context --rate_weight="$rw"
    done
    run vq_learned_rw0.01 --quantizer=vq --entropy_model=learned --rate_weight=0.01
    # the fair reference for the context prior: the same coder fitted to each surrogate-trained model
    for ckpt in "$out"/checkpoints/ddcl_w*_vae_best.pt; do
      case "$ckpt" in *_posthoc_vae_best.pt) continue ;; esac
      [ -f "${ckpt%_vae_best.pt}_posthoc_vae_best.pt" ] || python scripts/fit_context_prior.py "$ckpt" --data_dir="$data_dir"
    done ;;
  *) echo "unknown set $set_name: use bottlenecks or priors" >&2; exit 2 ;;
esac
# how the comparison moves with training: every run again at each 10th epoch (its epoch_N checkpoints)
for ((n = 10; n < epochs; n += 10)); do
  echo "== after $n of $epochs epochs"
  python evaluate.py "$out"/checkpoints/*_vae_epoch_$n.pt --output_dir="$out/outputs/epoch_$n" | cut -c1-140
done
echo "== best checkpoints after $epochs epochs"
python evaluate.py "$out"/checkpoints/*_best.pt --output_dir="$out/outputs"
