#!/usr/bin/env bash
# The whole pipeline on synthetic data, on a CPU, in a few minutes (`make demo`):
#   1 synthetic clips  ->  2 video shards  ->  3 latent shards  ->  4 train  ->  5 sample
# Everything lands in $DEMO_DIR (default runs/demo). Smaller settings for CI through the environment:
#   DEMO_DIR, DEMO_CLIPS (48), DEMO_PER_SHARD (12), DEMO_TRAIN_STEPS (40), DEMO_SAMPLE_STEPS (10),
#   DEMO_LAUNCHER (deepspeed | python; default deepspeed when its launcher is installed), PYTHON.
# Rerunning resumes: finished shards are kept and training continues from its latest checkpoint.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${DEMO_DIR:-runs/demo}
CLIPS=${DEMO_CLIPS:-48}
PER_SHARD=${DEMO_PER_SHARD:-12}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-40}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-10}
CONFIG=configs/tiny.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

DEEPSPEED="$(dirname "$PY")/deepspeed"
LAUNCHER=${DEMO_LAUNCHER:-$([ -x "$DEEPSPEED" ] && echo deepspeed || echo python)}

OVERRIDES=(
  "run.output_dir=$DIR"
  "data.video_shards=$DIR/shards"
  "data.latent_shards=$DIR/latents"
  "train.max_steps=$TRAIN_STEPS"
  "train.warmup_steps=$(( TRAIN_STEPS / 8 ))"
  "checkpoint.every_steps=$(( TRAIN_STEPS / 2 > 0 ? TRAIN_STEPS / 2 : 1 ))"
)
step() { printf '\n== %s\n' "$*"; }
start=$SECONDS

step "1/5 synthetic clips -> $DIR/clips (held-out first frame in $DIR/heldout)"
"$PY" -m i2v.data_prep.synthetic --output "$DIR/clips" --clips "$CLIPS" --heldout "$DIR/heldout"

step "2/5 video shards -> $DIR/shards"
"$PY" launcher/make_shards.py --input "$DIR/clips" --output "$DIR/shards" --samples-per-shard "$PER_SHARD"

step "3/5 latent shards (VAE + T5, noisy first-frame draws) -> $DIR/latents"
"$PY" launcher/precompute.py --config "$CONFIG" "${OVERRIDES[@]}"

step "4/5 train $TRAIN_STEPS steps ($LAUNCHER launcher) -> $DIR"
PROMPT=$(cat "$DIR/heldout/heldout.txt")
# Validation videos of the held-out pair at half-way and at the end, shown in TensorBoard.
VALIDATION=(
  "validation.every_steps=$(( TRAIN_STEPS / 2 > 0 ? TRAIN_STEPS / 2 : 1 ))"
  "validation.num_inference_steps=$SAMPLE_STEPS"
  "validation.pairs=[{image: \"$DIR/heldout/heldout.png\", prompt: \"$PROMPT\"}]"
)
if [ "$LAUNCHER" = deepspeed ]; then
  "$DEEPSPEED" --num_gpus 1 launcher/train.py --config "$CONFIG" "${OVERRIDES[@]}" "${VALIDATION[@]}"
else
  "$PY" launcher/train.py --config "$CONFIG" "${OVERRIDES[@]}" "${VALIDATION[@]}"
fi

step "5/5 sample from the held-out first frame -> $DIR/samples"
"$PY" launcher/sample.py --config "$CONFIG" "${OVERRIDES[@]}" --checkpoint "$DIR/checkpoints" \
  --image "$DIR/heldout/heldout.png" --prompt "$PROMPT" --steps "$SAMPLE_STEPS" \
  --out "$DIR/samples/heldout.gif" --out "$DIR/samples/heldout.mp4"

cat <<EOF

== demo finished in $(( SECONDS - start )) s
  clips + captions:   $DIR/clips/            (held-out frame: $DIR/heldout/heldout.png, "$PROMPT")
  video shards:       $DIR/shards/
  latent shards:      $DIR/latents/          (manifest.json, rejects.jsonl)
  checkpoints:        $DIR/checkpoints/      (newest: $(cat "$DIR/checkpoints/latest" 2>/dev/null || echo '?'))
  metrics:            $DIR/metrics.jsonl
  tensorboard:        $DIR/tensorboard/      (loss, lr, grad norm, throughput; validation/pair-0 videos)
  validation videos:  $DIR/samples/step-*/pair-0.mp4
  sampled video:      $DIR/samples/heldout.gif  $DIR/samples/heldout.mp4
Open TensorBoard with:
  $(dirname "$PY")/tensorboard --logdir $DIR/tensorboard    # then browse http://localhost:6006
The tiny VAE and T5 are random-init stand-ins, so the sampled frames show the pipeline works,
not a pretty video; point precompute.vae/text_encoder and model at real weights for that.
EOF
