#!/usr/bin/env bash
# The whole pipeline on synthetic data, on a CPU, in a few minutes (`make demo`):
#   1 synthetic clips  ->  2 video shards  ->  3 fit the tiny VAE  ->  4 latent shards  ->  5 train  ->  6 sample
# Everything lands in $DEMO_DIR (default runs/demo). Smaller settings for CI through the environment:
#   DEMO_DIR, DEMO_CLIPS (48), DEMO_PER_SHARD (12), DEMO_VAE_STEPS (500; 0 keeps the random-init VAE),
#   DEMO_TRAIN_STEPS (1500: enough for the tiny DiT to hold the first frame's shape, ~15 ms each),
#   DEMO_SAMPLE_STEPS (10),
#   DEMO_LAUNCHER (deepspeed | python; default deepspeed when its launcher is installed), PYTHON.
# Rerunning resumes: a fitted VAE and finished shards are kept and training continues from its latest checkpoint.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${DEMO_DIR:-runs/demo}
CLIPS=${DEMO_CLIPS:-48}
PER_SHARD=${DEMO_PER_SHARD:-12}
VAE_STEPS=${DEMO_VAE_STEPS:-500}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-1500}
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
# A random-init VAE decodes everything to texture noise; the fitted one (step 3) makes the
# latents, and so every video below, show the shapes. Every stage after it must load it.
if [ "$VAE_STEPS" -gt 0 ]; then
  OVERRIDES+=("precompute.vae.pretrained=$DIR/vae" "precompute.vae.arch={}")
fi
step() { printf '\n== %s\n' "$*"; }
start=$SECONDS

step "1/6 synthetic clips -> $DIR/clips (held-out first frame in $DIR/heldout)"
"$PY" -m i2v.data_prep.synthetic --output "$DIR/clips" --clips "$CLIPS" --heldout "$DIR/heldout"

step "2/6 video shards -> $DIR/shards"
"$PY" launcher/make_shards.py --input "$DIR/clips" --output "$DIR/shards" --samples-per-shard "$PER_SHARD"

if [ "$VAE_STEPS" -le 0 ]; then
  step "3/6 fit the tiny VAE: skipped (DEMO_VAE_STEPS=0), the random-init VAE stays"
elif [ -f "$DIR/vae/config.json" ]; then
  # Latents already made with it would no longer match a refitted one.
  step "3/6 fit the tiny VAE: kept $DIR/vae (remove it to refit)"
else
  step "3/6 fit the tiny VAE, $VAE_STEPS steps -> $DIR/vae"
  "$PY" -m i2v.data_prep.fit_vae --config "$CONFIG" --clips "$DIR/shards" --out "$DIR/vae" --steps "$VAE_STEPS"
fi

step "4/6 latent shards (VAE + T5, noisy first-frame draws) -> $DIR/latents"
"$PY" launcher/precompute.py --config "$CONFIG" "${OVERRIDES[@]}"

step "5/6 train $TRAIN_STEPS steps ($LAUNCHER launcher) -> $DIR"
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

step "6/6 sample from the held-out first frame -> $DIR/samples"
"$PY" launcher/sample.py --config "$CONFIG" "${OVERRIDES[@]}" --checkpoint "$DIR/checkpoints" \
  --image "$DIR/heldout/heldout.png" --prompt "$PROMPT" --steps "$SAMPLE_STEPS" \
  --out "$DIR/samples/heldout.gif" --out "$DIR/samples/heldout.mp4"

if [ "$VAE_STEPS" -gt 0 ]; then
  NOTE="The VAE was fitted for $VAE_STEPS steps on these clips ($DIR/vae, fit.json), so the videos show the
first frame's shape: a blurry blob with roughly its colour, kept in place over the frames. The T5 is a
random-init stand-in, so the caption steers the motion only weakly. Point precompute.vae,
precompute.text_encoder and model at real weights for real videos."
else
  NOTE="The tiny VAE and T5 are random-init stand-ins (DEMO_VAE_STEPS=0), so the sampled frames are texture
noise that shows the pipeline works; point precompute.vae/text_encoder and model at real weights for that."
fi
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
$NOTE
EOF
