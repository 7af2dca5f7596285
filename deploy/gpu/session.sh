#!/usr/bin/env bash
# One GPU session for issues 28 and 30, in the order that keeps the timings clean: the split path's kernel test,
# the 32K "KV against recompute" table from an older tree ($AB, an older commit's `git archive`, carried) and from
# this one, side by side on the same machine, profile_wire, both nodes' frame work on the host (kvwire bench
# frames), the receiver's first token (first_token.py), and 128K where the GPU holds both nodes (BASELINE128: the
# precision row there, '' for none); only then the quality runs: SmolLM2's answers across devices, and with QWEN=1
# the CPU-heavy Qwen conversion and Qwen at 32K on two fresh prompt draws, in parallel.
#   deploy/gpu/run.sh bg session "AB=.ab_old deploy/gpu/session.sh /tmp/bg/session"
# while later calls bring SmolLM2's parts (deploy/gpu/run.sh part .gp1, .gp2), Qwen's basis (.basis_q, into
# /tmp/kvwire-basis) and its GGUF (deploy/gpu/ship_qwen.sh piece .qwNN ... join); the Qwen steps wait for
# the joined GGUF. Each step writes its files under $1 as it ends (deploy/gpu/run.sh collect).
set -uo pipefail
OUT=${1:?"give the output folder"}
mkdir -p "$OUT/old" "$OUT/new" "$OUT/crossdev" "$OUT/qwen"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 KVWIRE_CACHE_DIR=/tmp/kvwire-cache
step() { echo "[$(date +%T)] $*"; }

step "kernel test"
python3 -m pytest -q -p no:cacheprovider tests/gpu -k pca_split 2>&1 | tail -3 | tee "$OUT/gpu_kernel_tests.txt"
rows="RATES=10gbit FRONTIER=${FRONTIER:-pca:b1:w:e:j:a,pca:b0.7:w:e:j:a}"
at32k="CONTEXTS=32768 LIMIT=240 MAX_ROW_S=60"
if [ -n "${AB:-}" ]; then
  step "recompute table, old tree ($AB)"
  (cd "$AB" && env $rows $at32k deploy/gpu/run.sh recompute "$OUT/old" > /dev/null 2>&1)
fi
step "recompute table, this tree"
env $rows $at32k deploy/gpu/run.sh recompute "$OUT/new" > /dev/null 2>&1
step "profile_wire"
python3 deploy/gpu/profile_wire.py "$OUT/profile_wire.json" 32768 pca:b0.7:w:e:j:a > "$OUT/profile_wire.txt" 2>&1
step "the sender's frame making on this host (kvwire bench frames)"
python3 -m channel.cli bench frames --repeats 5 --json "$OUT/bench_frames.json" > "$OUT/bench_frames.txt" 2>&1
step "the receiver's first token at 32K and 128K (first_token.py)"
python3 deploy/gpu/first_token.py "$OUT/first_token.json" 32768 131072 > "$OUT/first_token.txt" 2>&1
if python3 -c "import sys, torch; sys.exit(torch.cuda.get_device_properties(0).total_memory < 100e9)"; then
  step "recompute table at 128K (a GPU that holds both nodes)"
  mkdir -p "$OUT/new128"
  env $rows CONTEXTS=131072 LIMIT=420 MAX_ROW_S=120 BUDGET=400 BASELINE="${BASELINE128-int4}" \
    deploy/gpu/run.sh recompute "$OUT/new128" \
    > /dev/null 2>&1
fi
touch "$OUT/timings.done"

if [ -z "${QWEN:-}" ]; then
  step "SmolLM2 across devices"
  deploy/gpu/run.sh crossdev "$OUT/crossdev" > /dev/null 2>&1
  step "done"
  exit 0
fi
step "waiting for Qwen's GGUF"
for _ in $(seq 600); do [ -f /tmp/kvwire-cache/gguf/qwen2.5-coder-1.5b.gguf ] && break; sleep 1; done
step "Qwen: convert"
deploy/gpu/qwen.sh prepare "$OUT/qwen" > /dev/null 2>&1
step "Qwen sets C and D, SmolLM2 across devices"
for seed in 2 3; do
  SEED=$seed LENGTHS=32000 DEPTHS=0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95,1 \
    MULTIKEY=19 PROFILES=fp16,pca:b1.2:w:e:j:a:i1:f3+text:h deploy/gpu/qwen.sh longcontext "$OUT/qwen" > /dev/null 2>&1 &
done
deploy/gpu/run.sh crossdev "$OUT/crossdev" > /dev/null 2>&1
wait
step "done"
