#!/usr/bin/env bash
# The whole pipeline on synthetic data, on a CPU, in 4-6 minutes on 2 cores (`make demo`):
#   1 synthetic clips -> 2 video shards -> 3 fit the tiny VAE -> 4 latent shards -> 5 train -> 6 sample -> 7 evaluate
# Everything lands in $DEMO_DIR (default runs/demo). Other settings through the environment:
#   DEMO_DIR, DEMO_CLIPS (192), DEMO_PER_SHARD (48),
#   DEMO_VAE (configs/tiny-vae: the committed tiny VAE | fit: fit one on these clips into $DEMO_DIR/vae |
#   random: the config's random-init VAE), DEMO_VAE_STEPS (700, with DEMO_VAE=fit),
#   DEMO_FRAMES (data.video.frames), DEMO_SIZE (frame height and width; data.video's), DEMO_TRAIN_STEPS (3000),
#   DEMO_RANKS (2: data-parallel training ranks, one a core), DEMO_BATCH (8: samples per optimizer step over
#   all ranks), DEMO_LR (8e-3), DEMO_GUIDANCE (3), DEMO_VAE_CROP_AT (mixed | content | random, with DEMO_VAE=fit),
#   DEMO_SAMPLE_STEPS (validation.num_inference_steps), DEMO_EVAL_PAIRS (16),
#   DEMO_SEED (0: run.seed and the synthetic clips' seed), DEMO_DIRECTIONS (2: each drawn first frame
#   moving both ways, so that only the caption tells which; 1: one direction per first frame),
#   DEMO_QUALITY_JSON (bench/results/demo-quality.json; empty: not written),
#   DEMO_OVERRIDES (more config overrides for every stage, space-separated KEY=VALUE without spaces inside,
#   e.g. "model.fp8.compute=tensorwise"; bench/fp8_quality.py trains its variants this way),
#   DEMO_LAUNCHER (deepspeed | python; default deepspeed when its launcher is installed; python trains on one
#   rank), PYTHON, MASTER_PORT (the training's rendezvous port; default a free one).
# Rerunning resumes: finished stages are kept (clips with the same settings, shards, the fitted VAE,
# latent shards, a finished training run, its sample and its evaluation) and the rest is redone.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${DEMO_DIR:-runs/demo}
CLIPS=${DEMO_CLIPS:-192}
PER_SHARD=${DEMO_PER_SHARD:-48}
VAE=${DEMO_VAE:-configs/tiny-vae}
VAE_STEPS=${DEMO_VAE_STEPS:-700}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-3000}
BATCH=${DEMO_BATCH:-8}
EVAL_PAIRS=${DEMO_EVAL_PAIRS:-16}
SEED=${DEMO_SEED:-0}
DIRECTIONS=${DEMO_DIRECTIONS:-2}
QUALITY_JSON=${DEMO_QUALITY_JSON-bench/results/demo-quality.json}
CONFIG=configs/tiny.yaml
# One thread a process: the tiny models' ops are too small to gain from a second thread (76 against 73
# samples/s, 48 x 48 clips at micro-batch 8). The second core trains a second data-parallel rank instead
# (DEMO_RANKS): 107 samples/s at 2 x 4 against 77 at 1 x 8, 64 x 64 clips.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# DeepSpeed's CPU op, built with the venv (see the Makefile), is looked up where it was built.
VENV_DIR=$(cd "$(dirname "$PY")/.." && pwd)
[ -f "$VENV_DIR/bin/activate" ] && export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV_DIR/torch_extensions}

DEEPSPEED="$(dirname "$PY")/deepspeed"
LAUNCHER=${DEMO_LAUNCHER:-$([ -x "$DEEPSPEED" ] && echo deepspeed || echo python)}
RANKS=${DEMO_RANKS:-2}
[ "$LAUNCHER" = deepspeed ] || RANKS=1
if (( BATCH % RANKS )); then
  echo "demo: DEMO_BATCH=$BATCH must be a multiple of the training ranks ($RANKS, DEMO_RANKS)" >&2
  exit 2
fi
# The clips are drawn at the size and length the model trains on, so each is one whole trajectory:
# the config's (9 x 64 x 64: 3 x 16 x 16 latents, 192 tokens, 8 pixels a token), or DEMO_FRAMES and
# DEMO_SIZE (at 48 x 48: 3 x 12 x 12, 108 tokens, the same 8 pixels and the same travel over the
# clip). SHAPE hands the sizes to every stage; the VAE's spatial compression is the config's ratio of
# frame to latent size. With the VAE's 4x temporal compression, frames must be 8k + 1, an odd latent
# count: it decodes 2 latent frames to 8 frames, not 5.
read -r FRAMES HEIGHT WIDTH SPATIAL < <("$PY" -c "from i2v.config import load_config; c = load_config('$CONFIG'); v = c.data.video; print(v.frames, v.height, v.width, v.height // c.model.arch['sample_height'])")
FRAMES=${DEMO_FRAMES:-$FRAMES} HEIGHT=${DEMO_SIZE:-$HEIGHT} WIDTH=${DEMO_SIZE:-$WIDTH}
if (( FRAMES % 8 != 1 || HEIGHT % (2 * SPATIAL) || WIDTH % (2 * SPATIAL) )); then
  echo "demo: DEMO_FRAMES=$FRAMES DEMO_SIZE=$HEIGHT: frames must be 8k + 1 (1, 9, 17, ...) and the size a multiple of $(( 2 * SPATIAL ))" >&2
  exit 2
fi
SHAPE=(
  "data.video.frames=$FRAMES" "data.video.height=$HEIGHT" "data.video.width=$WIDTH"
  "model.arch.sample_frames=$FRAMES" "model.arch.sample_height=$(( HEIGHT / SPATIAL ))"
  "model.arch.sample_width=$(( WIDTH / SPATIAL ))"
)

OVERRIDES=(
  "${SHAPE[@]}"
  "run.output_dir=$DIR"
  "run.seed=$SEED"
  "data.video_shards=$DIR/shards"
  "data.latent_shards=$DIR/latents"
  "train.max_steps=$TRAIN_STEPS"
  "train.warmup_steps=$(( TRAIN_STEPS / 8 ))"
  # Steps of 8 samples (4 a rank) at lr 8e-3. With a VAE fitted in the demo (700 steps), on 16 held-out
  # pairs at seed 0: fidelity 88% and caption motion 81% after 2000 steps, 100% / 88% after 2500; with
  # configs/tiny-vae, 100% / 94% after 3000 (one rank of 8).
  "train.global_batch_size=$BATCH"
  "train.micro_batch_size=$(( BATCH / RANKS ))"
  "train.lr=${DEMO_LR:-8e-3}"
  # Guidance 3, not the config's 6: at 6 the sampler pushes warm hues across the palette (orange sampled
  # as red), 94% fidelity against 100% at 3 for the same checkpoint; motion 94% at 3, 81% without guidance.
  "validation.guidance_scale=${DEMO_GUIDANCE:-3}"
  # ZeRO-1: ZeRO-2's gradient partitioning buys nothing for a 0.3M-parameter model on CPU ranks and costs
  # a third of each tiny step (86 vs 126 samples/s at micro-batch 4, one rank).
  "deepspeed.zero_stage=1"
  # Four DiT blocks: with two, held-out clips followed their caption in 25% of pairs, with four in 88% (seed 0).
  "model.arch.num_layers=4"
  "checkpoint.every_steps=$(( TRAIN_STEPS / 2 > 0 ? TRAIN_STEPS / 2 : 1 ))"
)
[ -n "${DEMO_SAMPLE_STEPS:-}" ] && OVERRIDES+=("validation.num_inference_steps=$DEMO_SAMPLE_STEPS")
read -r -a EXTRA_OVERRIDES <<< "${DEMO_OVERRIDES:-}"
OVERRIDES+=(${EXTRA_OVERRIDES[@]+"${EXTRA_OVERRIDES[@]}"})
# A random-init VAE decodes everything to texture noise; a fitted one makes the latents, and so every
# video below, show the shapes. Precompute encodes with it; training, sampling and evaluation take it from the
# latents' manifest (i2v/data/lineage.py). The inline shape of DEMO_VAE=random and =fit is configs/tiny-vae's
# (8-16-32 channels; `make tiny-vae` fits it the same way).
ARCH="{in_channels: 3, out_channels: 3, down_block_types: [CogVideoXDownBlock3D, CogVideoXDownBlock3D, CogVideoXDownBlock3D], up_block_types: [CogVideoXUpBlock3D, CogVideoXUpBlock3D, CogVideoXUpBlock3D], block_out_channels: [8, 16, 32], latent_channels: 4, layers_per_block: 1, norm_num_groups: 1, temporal_compression_ratio: 4, sample_height: $HEIGHT, sample_width: $WIDTH}"
# VAE_SHOWN and VAE_NOTE only word the closing summary: what this run's VAE is and where it came from.
case "$VAE" in
  random) VAE_DIR=; OVERRIDES+=("precompute.vae.pretrained=null" "precompute.vae.arch=$ARCH")
    VAE_SHOWN="none: random-init from run.seed, inline (DEMO_VAE=random)"
    VAE_NOTE="the VAE is random-init (DEMO_VAE=random), so it decodes to texture noise" ;;
  fit) VAE_DIR=$DIR/vae; OVERRIDES+=("precompute.vae.pretrained=$VAE_DIR")
    VAE_SHOWN="$VAE_DIR/  (fitted on this demo's clips, DEMO_VAE=fit; fit.json: how)"
    VAE_NOTE="the VAE was fitted on these clips (DEMO_VAE=fit)" ;;
  *)
    VAE_DIR=$VAE
    VAE_SHOWN="$VAE_DIR/  (pretrained, loaded as it is)"
    VAE_NOTE="the VAE was loaded pretrained from $VAE_DIR"
    if [ "$VAE_DIR" = configs/tiny-vae ]; then
      VAE_SHOWN="$VAE_DIR/  (pretrained, loaded as it is; fit.json: how \`make tiny-vae\` fitted it)"
      VAE_NOTE="$VAE_NOTE, fitted offline by \`make tiny-vae\` on clips no demo draws"
    fi
    if [ ! -f "$VAE_DIR/config.json" ]; then
      echo "demo: DEMO_VAE=$VAE: no diffusers VAE there (no config.json); expected a directory, fit or random" >&2
      exit 2
    fi
    OVERRIDES+=("precompute.vae.pretrained=$VAE_DIR") ;;
esac

TIMES=()  # "stage seconds kept|ran", one per stage
stage_start=$SECONDS
step() { printf '\n== %s\n' "$*"; stage_start=$SECONDS; }
done_stage() {  # done_stage NAME ran|kept
  local took=$(( SECONDS - stage_start ))
  TIMES+=("$1 $took $2")
  printf -- '-- %s: %d s%s\n' "$1" "$took" "$([ "$2" = kept ] && echo ' (kept from an earlier run)')"
}
start=$SECONDS
LATEST="$DIR/checkpoints/latest"
FINAL=$(printf 'step-%08d' "$TRAIN_STEPS")

step "1/7 synthetic clips -> $DIR/clips (held-out first frame in $DIR/heldout)"
"$PY" -m i2v.data.synthetic --output "$DIR/clips" --clips "$CLIPS" --directions-per-frame "$DIRECTIONS" --seed "$SEED" --frames "$FRAMES" --height "$HEIGHT" \
  --width "$WIDTH" --heldout "$DIR/heldout"
done_stage clips ran

step "2/7 video shards -> $DIR/shards"
"$PY" launcher/make_shards.py --input "$DIR/clips" --output "$DIR/shards" --samples-per-shard "$PER_SHARD"
done_stage shards ran

if [ "$VAE" = random ]; then
  step "3/7 VAE: a random-init one (DEMO_VAE=random)"
  done_stage vae kept
elif [ "$VAE" != fit ]; then
  # Like a real run's pretrained VAE: fitted once, offline, on clips that no demo draws (its fit.json says how).
  step "3/7 VAE: $VAE_DIR (pretrained; DEMO_VAE=fit fits one on these clips instead)"
  done_stage vae kept
elif [ -f "$DIR/vae/config.json" ]; then
  # Latents already made with it would no longer match a refitted one.
  step "3/7 fit the tiny VAE: kept $DIR/vae (remove it to refit)"
  done_stage vae kept
else
  step "3/7 fit the tiny VAE, $VAE_STEPS steps -> $DIR/vae"
  # The same shape as configs/tiny-vae (`make tiny-vae`): 8-16-32 channels, a quarter of the config's cost at
  # full resolution, fitted on the posterior mode; fewer steps, on these clips.
  "$PY" -m i2v.data_prep.fit_vae --config "$CONFIG" --clips "$DIR/shards" --out "$DIR/vae" --steps "$VAE_STEPS" \
    --image-batch-size 8 --crop-at "${DEMO_VAE_CROP_AT:-mixed}" "${SHAPE[@]}" \
    "precompute.vae.pretrained=null" "precompute.vae.arch=$ARCH"
  done_stage vae ran
fi

step "4/7 latent shards (VAE + T5, noisy first-frame draws) -> $DIR/latents"
"$PY" launcher/precompute.py --config "$CONFIG" "${OVERRIDES[@]}"
done_stage precompute ran

PROMPT=$(cat "$DIR/heldout/heldout.txt")
if [ "$(cat "$LATEST" 2>/dev/null)" = "$FINAL" ]; then
  step "5/7 train: kept $DIR/checkpoints/$FINAL"
  done_stage train kept
else
  step "5/7 train $TRAIN_STEPS steps of $BATCH samples on $RANKS rank(s) ($LAUNCHER launcher) -> $DIR"
  # Validation videos of the held-out pair at half-way and at the end, shown in TensorBoard.
  VALIDATION=(
    "validation.every_steps=$(( TRAIN_STEPS / 2 > 0 ? TRAIN_STEPS / 2 : 1 ))"
    "validation.pairs=[{image: \"$DIR/heldout/heldout.png\", prompt: \"$PROMPT\"}]"
  )
  if [ "$LAUNCHER" = deepspeed ]; then
    # A free port, not the launcher's fixed 29500: a demo must not collide with a job already on the box.
    PORT=${MASTER_PORT:-$("$PY" -c "from i2v.core.distributed import free_port; print(free_port())")}
    "$DEEPSPEED" --num_gpus "$RANKS" --master_port "$PORT" launcher/train.py --config "$CONFIG" "${OVERRIDES[@]}" "${VALIDATION[@]}"
  else
    "$PY" launcher/train.py --config "$CONFIG" "${OVERRIDES[@]}" "${VALIDATION[@]}"
  fi
  done_stage train ran
fi

# A stage after training is finished when its output is newer than the checkpoint it used.
if [ "$DIR/samples/heldout.gif" -nt "$LATEST" ]; then
  step "6/7 sample from the held-out first frame: kept $DIR/samples/heldout.gif"
  done_stage sample kept
else
  step "6/7 sample from the held-out first frame -> $DIR/samples"
  "$PY" launcher/sample.py --config "$CONFIG" "${OVERRIDES[@]}" --checkpoint "$DIR/checkpoints" \
    --image "$DIR/heldout/heldout.png" --prompt "$PROMPT" --out "$DIR/samples/heldout.gif" --out "$DIR/samples/heldout.mp4"
  done_stage sample ran
fi

if [ "$DIR/eval.json" -nt "$LATEST" ]; then
  step "7/7 evaluate: kept $DIR/eval.json"
  done_stage evaluate kept
else
  step "7/7 evaluate on $EVAL_PAIRS held-out pairs, and the two ablations -> $DIR/eval.json, $DIR/eval.png"
  "$PY" launcher/evaluate.py --config "$CONFIG" "${OVERRIDES[@]}" --checkpoint "$DIR/checkpoints" \
    --pairs "$EVAL_PAIRS" --ablation zero_image --ablation swap_caption
  done_stage evaluate ran
fi
TOTAL=$(( SECONDS - start ))

if [ -n "$QUALITY_JSON" ]; then
  "$PY" bench/demo_quality.py --eval "$DIR/eval.json" --out "$QUALITY_JSON" --total "$TOTAL" "${TIMES[@]/#/--stage=}"
fi

cat <<EOF

== demo finished in $TOTAL s ($(printf '%s; ' "${TIMES[@]}" | sed 's/ ran;/ s;/g; s/ kept;/ s kept;/g'))
  clips + captions:   $DIR/clips/            (specs.json: true trajectories; held-out frame: $DIR/heldout/heldout.png, "$PROMPT")
  video shards:       $DIR/shards/
  VAE:                $VAE_SHOWN
  latent shards:      $DIR/latents/          (manifest.json, rejects.jsonl)
  checkpoints:        $DIR/checkpoints/      (newest: $(cat "$LATEST" 2>/dev/null || echo '?'))
  metrics:            $DIR/metrics.jsonl
  tensorboard:        $DIR/tensorboard/      (loss, lr, grad norm, throughput; validation/pair-0 videos; evaluation/*)
  validation videos:  $DIR/samples/step-*/pair-0.mp4
  sampled video:      $DIR/samples/heldout.gif  $DIR/samples/heldout.mp4
  evaluation:         $DIR/eval.json  (ablations: $DIR/eval-zero_image.png  $DIR/eval-swap_caption.png)
Open TensorBoard with:
  $(dirname "$PY")/tensorboard --logdir $DIR/tensorboard    # then browse http://localhost:6006
The T5 and the VAE are tiny stand-ins (the T5 is random-init; $VAE_NOTE); point precompute.vae,
precompute.text_encoder and model at real CogVideoX weights for real videos.

EOF
"$PY" -c "import json, sys; from i2v.sample.evaluation import headline; print(headline(json.load(open(sys.argv[1]))))" "$DIR/eval.json"
echo "picture: $DIR/eval.png  (per pair: true first frame | sampled frames | true frames)"
