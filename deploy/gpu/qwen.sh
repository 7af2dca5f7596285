#!/usr/bin/env bash
# Issue 30's measurements on qwen2.5-coder-1.5b, on a CUDA machine (docs/qwen.md). Not yet run: no
# GPU was lent when this was written. Before these, in the same warm machine: the wheels
# (deploy/gpu/run.sh wheels/install), a SQuAD file in .data/ (run.sh install copies it to
# /tmp/data), and the GGUF (deploy/gpu/ship_qwen.sh piece ... then join). Each step is one device
# call of at most 10 minutes; OUT is the call's $OUT.
#   deploy/gpu/qwen.sh prepare OUT      # convert once into the cache; fingerprint, shape
#   deploy/gpu/qwen.sh basis OUT        # PCA basis (--metric --weights 32) then its joint transform, on
#                                       # paragraphs outside the embedded subset; OUT/basis-qwen2.5-coder-1.5b.safetensors
#   deploy/gpu/qwen.sh eval OUT         # fp16, int8, int4, q2c:0.5+int4, snapkv:0.5 on HELD_OUT (200) questions
#   deploy/gpu/qwen.sh frontier OUT     # kvwire frontier: tuned on TUNE (24) questions of the SQuAD file,
#                                       # measured on HELD_OUT (200) of the embedded subset beside the eval
#                                       # step's five baselines: OUT/frontier_qwen.json
#   deploy/gpu/qwen.sh longcontext OUT  # needle and multi-key at 4K, 16K, 32K tokens: OUT/longcontext_qwen.json
# The basis lives in this machine's copy of the tree (common/data/) once fitted: later steps use it.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 KVWIRE_CACHE_DIR=/tmp/kvwire-cache
MODEL=qwen2.5-coder-1.5b
RUN="python3 -m channel.cli"
SQUAD=/tmp/data/squad-v2-dev-public.json
BASIS=common/data/basis-$MODEL.safetensors
OUT=${2:?"give the output folder: the device call's \$OUT"}

case "$1" in
prepare)
  $RUN prepare --model $MODEL --device cuda --dtype bfloat16 2>&1 | tee "$OUT/prepare.txt"
  ;;
basis)  # float32 for the fit, as the shipped bases were; the weights' hash does not depend on the dtype
  $RUN calibrate --basis --metric --weights 32 --model $MODEL --data $SQUAD --samples 128 \
    --device cuda --dtype float32 --out $BASIS 2>&1 | tee "$OUT/basis.txt"
  $RUN calibrate --basis --joint --model $MODEL --data $SQUAD --samples 128 \
    --device cuda --dtype float32 --out $BASIS 2>&1 | tee -a "$OUT/basis.txt"
  cp $BASIS "$OUT/"
  ;;
eval)
  $RUN eval --model $MODEL --device cuda --dtype bfloat16 --samples "${HELD_OUT:-200}" \
    --profiles fp16,int8,int4:g32,q2c:0.5+int4:g32,snapkv:0.5+fp16 --json "$OUT/eval_qwen.json" 2>&1 \
    | tee "$OUT/eval_qwen.txt"
  ;;
frontier)
  [ -f $BASIS ] || { echo "no basis in this tree: run the basis step first (or carry its file)" >&2; exit 2; }
  $RUN frontier --model $MODEL --device cuda --dtype bfloat16 --tune-data $SQUAD --tune-skip 510 \
    --baselines fp16,int8,int4:g32,q2c:0.5+int4:g32,snapkv:0.5+fp16 --tune-samples "${TUNE:-24}" --samples "${HELD_OUT:-200}" --json "$OUT/frontier_qwen.json" 2>&1 \
    | tee "$OUT/frontier_qwen.txt"
  ;;
longcontext)  # 32512 tokens is the most that leaves room for the template and answer in 32768 positions
  $RUN longcontext --model $MODEL --device cuda --dtype bfloat16 --lengths "${LENGTHS:-4096,16384,32000}" \
    --profiles "${PROFILES:-fp16,int4:g32,snapkv:0.25+fp16,q2c:0.25+fp16}" --json "$OUT/longcontext_qwen.json" 2>&1 \
    | tee "$OUT/longcontext_qwen.txt"
  ;;
*)
  sed -n '2,15p' "$0" >&2
  exit 2
  ;;
esac
