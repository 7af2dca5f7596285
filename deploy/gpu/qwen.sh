#!/usr/bin/env bash
# Issue 30's measurements on qwen2.5-coder-1.5b, on a CUDA machine (docs/qwen.md; run on an H100 in
# session 14: prepare, basis and frontier; longcontext not yet). Before these, in the same warm machine: the wheels
# (deploy/gpu/run.sh wheels/install), a SQuAD file in .data/ (run.sh install copies it to
# /tmp/data), and the GGUF (deploy/gpu/ship_qwen.sh piece ... then join). Each step is one device
# call of at most 10 minutes; OUT is the call's $OUT.
#   deploy/gpu/qwen.sh prepare OUT      # convert once into the cache; fingerprint, shape
#   deploy/gpu/qwen.sh basis OUT        # PCA basis (--metric --weights 32) then its joint transform, on
#                                       # paragraphs outside the embedded subset, where the shipped one is not
#                                       # in the tree (deploy/gpu/devtree.sh keeps it out of the 64 MiB):
#                                       # into $KVWIRE_BASIS_DIR and OUT
#   deploy/gpu/qwen.sh eval OUT         # fp16, int8, int4, q2c:0.5+int4, snapkv:0.5 on HELD_OUT (200) questions
#   deploy/gpu/qwen.sh frontier OUT     # kvwire frontier of CANDIDATES: tuned on TUNE (24) questions of the SQuAD
#                                       # file, measured on HELD_OUT (200) of the embedded subset beside BASELINES
#                                       # (the eval step's five): OUT/frontier_qwen.json
#   deploy/gpu/qwen.sh longcontext OUT  # needle and multi-key at 32K, 16K, 4K tokens (LENGTHS; SEED: the draw):
#                                       # OUT/longcontext_qwen_N[_seedS].json
#   deploy/gpu/qwen.sh all OUT          # prepare, then (once /tmp/bg/issue28.done exists, or after WAIT s: the GPU is
#                                       # shared) basis, frontier and longcontext, each step's files in OUT as it ends;
#                                       # run detached (deploy/gpu/run.sh bg qwen "deploy/gpu/qwen.sh all /tmp/bg/qwen"),
#                                       # with calls that collect (deploy/gpu/run.sh collect) every few minutes: the
#                                       # machine goes back 30 s after the last call ends
set -euo pipefail
# The basis is fitted into KVWIRE_BASIS_DIR, outside the tree: each device call copies the tree afresh and
# removes from it what this machine's checkout does not hold (a fitted basis there vanished mid-run once)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 KVWIRE_CACHE_DIR=/tmp/kvwire-cache \
  KVWIRE_BASIS_DIR=/tmp/kvwire-basis
MODEL=qwen2.5-coder-1.5b
RUN="python3 -m channel.cli"
SQUAD=/tmp/data/squad-v2-dev-public.json
BASIS=$KVWIRE_BASIS_DIR/basis-$MODEL.safetensors
# the frontier's candidates: the entropy-coded joint stage with per-token steps (SmolLM2's picks at 6.25% and
# 12.5%) over a range of rates, rANS-coded where the cache is (:a, on the GPU)
CANDIDATES=${CANDIDATES:-$(for b in 0.4 0.7 1.1 1.6 2.3 3.3 4.6; do printf 'pca:b%s:w:e:j:a:i1:f3,' $b; done | sed 's/,$//')}
OUT=${2:?"give the output folder: the device call's \$OUT"}
# deploy/gpu/devtree.sh keeps the shipped basis (22 MB) out of the tree a call sends; a call may carry it
# instead as .basis/ (an ignored copy of common/data/basis-$MODEL.safetensors), which saves the fit
if [ -f ".basis/basis-$MODEL.safetensors" ] && [ ! -f "$BASIS" ]; then
  mkdir -p "$KVWIRE_BASIS_DIR" && cp ".basis/basis-$MODEL.safetensors" "$BASIS"
fi

case "$1" in
prepare)  # converting is CPU work: the GPU may still be busy with another run
  $RUN prepare --model $MODEL --device cpu --dtype float32 2>&1 | tee "$OUT/prepare.txt"
  ;;
basis)  # float32 for the fit, as the shipped bases were; the weights' hash does not depend on the dtype
  mkdir -p "$KVWIRE_BASIS_DIR"
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
  [ -f $BASIS ] || [ -f common/data/basis-$MODEL.safetensors ] \
    || { echo "no basis: run the basis step first (or carry .basis/basis-$MODEL.safetensors)" >&2; exit 2; }
  $RUN frontier --model $MODEL --device cuda --dtype bfloat16 --tune-data $SQUAD --tune-skip 510 \
    --profiles "$CANDIDATES" --max-new-tokens "${NEW_TOKENS:-16}" \
    --baselines "${BASELINES:-fp16,int8,int4:g32,q2c:0.5+int4:g32,snapkv:0.5+fp16}" --tune-samples "${TUNE:-24}" --samples "${HELD_OUT:-200}" --json "$OUT/frontier_qwen.json" 2>&1 \
    | tee "$OUT/frontier_qwen.txt"
  ;;
longcontext)  # 32000 tokens leave room for the template and answer in 32768 positions; one run per length,
  # longest first, each writing its own file, so what a machine held for 30 minutes has time for survives
  # beside the fixed profiles, the frontier's picks at 6.25% and 3.125% where the frontier step has run
  picks=$(python3 -c "
import json, sys
try:
    rows = json.load(open('$OUT/frontier_qwen.json'))['frontier']
except (OSError, KeyError):
    sys.exit()
print(','.join(r['profile'] for r in rows if r['profile'] and r['budget'] <= 0.0625))")
  for length in ${LENGTHS:-32000 16384 4096}; do
    $RUN longcontext --model $MODEL --device cuda --dtype bfloat16 --lengths "$length" \
      --depths "${DEPTHS:-0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1}" --multikey "${MULTIKEY:-10}" \
      --profiles "${PROFILES:-fp16,int4:g32,snapkv:0.25+fp16,q2c:0.25+fp16}${picks:+,$picks}" ${SEED:+--seed $SEED} \
      --json "$OUT/longcontext_qwen_$length${SEED:+_seed$SEED}.json" 2>&1 | grep -v "Loading weights" \
      | tee "$OUT/longcontext_qwen_$length${SEED:+_seed$SEED}.txt" \
      || echo "longcontext at $length tokens failed"
  done
  ;;
all)
  mkdir -p "$OUT"
  "$0" prepare "$OUT"
  for _ in $(seq "${WAIT:-600}"); do [ -f /tmp/bg/issue28.done ] && break; sleep 1; done
  nvidia-smi --query-gpu=name,memory.used --format=csv | tee "$OUT/gpu.txt"
  [ -f common/data/basis-$MODEL.safetensors ] || [ -f "$BASIS" ] || "$0" basis "$OUT"
  "$0" frontier "$OUT" || true
  "$0" longcontext "$OUT"
  ;;
*)
  sed -n '2,15p' "$0" >&2
  exit 2
  ;;
esac
