#!/usr/bin/env bash
# `make demo`: the whole pipeline, offline, on a CPU, in a few minutes.
#
#   make demo                 # in the image (RUNNER=docker, no GPU)
#   make demo RUNNER=local    # in .venv
#
# 1. a tiny random Whisper (2 layers, d_model 64, the real multilingual tokenizer) built by
#    tests/helpers.py; 2. prepare the committed Common Voice fixture (Hindi, a few clips, some
#    deliberately broken rows that prepare skips and reports), and the English clips of
#    tests/fixtures/manifest; 3. train LoRA for a few steps; 4. evaluate (WER of the adapter and
#    of the base, long-form WER and timestamp validity on the fixture's 40-s clip, English WER and
#    language-ID accuracy through also=); 5. export the merged model.
# The numbers are meaningless (random weights); what it shows is every step, its outputs and
# where they land. Outputs: DATA_DIR/demo/ (the tiny base), DATA_DIR/prepared/demo-hi and demo-en,
# DATA_DIR/runs/demo (checkpoints, adapter/, eval/, merged/).
set -euo pipefail
cd "$(dirname "$0")/.."

# Offline and on the CPU whatever the machine has.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUDA_VISIBLE_DEVICES="" TOKENIZERS_PARALLELISM=false
data_dir=${DATA_DIR:-data}
model_dir="$data_dir/demo/tiny-whisper"
export_dir="$data_dir/runs/demo/merged"

step() { printf '\n== demo %s\n' "$*"; }

step "0/5 start clean: $data_dir/demo $data_dir/prepared/demo-hi $data_dir/prepared/demo-en $data_dir/runs/demo"
rm -rf "$data_dir/demo" "$data_dir/prepared/demo-hi" "$data_dir/prepared/demo-en" "$data_dir/runs/demo"

step "1/5 tiny random Whisper -> $model_dir"
python -c 'import sys; from pathlib import Path; from tests.helpers import build_tiny_whisper; build_tiny_whisper(Path(sys.argv[1]))' \
  "$model_dir"

step "2/5 prepare tests/fixtures/cv_release -> $data_dir/prepared/demo-hi"
python -m jobs.prepare data=demo-hi language=hi model="$model_dir" \
  source.kind=cv source.path=tests/fixtures/cv_release num_proc=1
# English clips for eval's forgetting / language-ID section (the fixture's en rows; its
# Hindi rows land in train, which eval does not read; a truncated clip is skipped and reported).
python -m jobs.prepare data=demo-en language=en model="$model_dir" \
  source.kind=manifest source.path=tests/fixtures/manifest/manifest.csv num_proc=1

step "3/5 train a few LoRA steps -> $data_dir/runs/demo"
python -m jobs.train --recipe jobs/recipes/whisper-base_lora_cpu.yaml run=demo data=demo-hi language=hi \
  model.base="$model_dir" train.max_steps=4 train.warmup_steps=1 train.eval_steps=2 train.save_steps=2 \
  train.logging_steps=1 train.batch_size=2 train.generation_max_length=16 train.max_eval_samples=4

step "4/5 evaluate the adapter (and the base): clips, long-form (a 40-s recording), English (also=)"
# The demo's test split is 4 short clips, too little to join into a recording longer than one
# 30-s window; the fixture's 40-s clip (too long for prepare) goes through long-form decoding
# instead, as a long-form set of your own would (longform.manifest=, audio,text columns).
printf 'audio,text\n%s,%s\n' "$PWD/tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3" \
  "एक लंबी कहानी शुरू होती है।" > "$data_dir/demo/longform.csv"
python -m jobs.eval run=demo data=demo-hi split=test language=hi batch_size=4 max_new_tokens=16 \
  longform.manifest="$data_dir/demo/longform.csv" also=demo-en

step "5/5 export the merged model -> $export_dir"
python -m jobs.export run=demo dtype=fp32

step "done. Outputs:"
missing=0
for path in "$model_dir" "$data_dir/prepared/demo-hi" "$data_dir/prepared/demo-en" "$data_dir/runs/demo" \
            "$data_dir/runs/demo/adapter" "$data_dir/runs/demo/eval" "$export_dir"; do
  if [ -e "$path" ]; then echo "  $path"; else echo "  $path (missing!)"; missing=1; fi
done
echo "  eval report: $data_dir/runs/demo/eval/report.md"
exit "$missing"
