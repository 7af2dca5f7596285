#!/usr/bin/env bash
# The GPU runs recorded in results/gpu/: on a CUDA machine without network, from the repository
# root, with the Python wheels kvwire needs in .whl/ and SmolLM2's GGUF file split in five parts
# (.gp1/a .. .gp5/e, `split -b 20000000 -a 1`: one transfer to that machine carries 64 MiB
# with the tree), brought over one per call while the machine stays warm:
#   deploy/gpu/run.sh wheels .whl_t # keep some wheels in /tmp/whl first when the tree and .whl/ together pass
#                                   # 64 MiB (session 9: transformers' wheel went over alone; session 11, with the
#                                   # joint basis in the tree: .whl_t, then .whl_u with grpcio and zstandard)
#   (session 12: the machine's grpcio 1.84.0 refuses grpcio-health-checking 1.85.1: carry grpcio 1.85.3 too)
#   deploy/gpu/run.sh install       # the wheels (.whl/ and /tmp/whl), into /tmp/site (and .data/, a SQuAD file,
#                                   # into /tmp/data); constriction's wheel is among them (pca:...:e)
#   deploy/gpu/run.sh part .gp1     # keep a part in /tmp/parts (carried paths vanish on the next call)
#   deploy/gpu/run.sh kernels OUT   # Triton kernels against torch, and codec throughput
#   python3 deploy/gpu/kernel_sweep.py   # tile shapes of the fast kernels (after install; PYTHONPATH as below)
#   deploy/gpu/run.sh all OUT       # SmolLM2 from its parts, every GPU test, kvwire bench gpu
#   deploy/gpu/run.sh smollm2 OUT   # SmolLM2 from its parts: lossless on CUDA, CPU sender -> GPU receiver
#   deploy/gpu/run.sh crossdev OUT  # SmolLM2 from its parts, its basis in /tmp/kvwire-basis: the frontier's greedy
#                                   # answers CPU/GPU sender x CPU/GPU receiver against CPU->CPU (tests/gpu)
#   deploy/gpu/run.sh frontier OUT  # SmolLM2 from its parts: kvwire frontier, tuned on /tmp/data, fp32 on CUDA
#                                   # (PROFILES, BASELINES: the candidates and baselines; TUNE, HELD_OUT: questions)
#   deploy/gpu/run.sh metric OUT    # SmolLM2 from its parts: the shipped basis against one fitted with
#                                   # --metric (written to /tmp/metric-basis), on the tuning questions
#                                   # (HELD_OUT=1: on the held-out ones, the fitted basis only)
#   deploy/gpu/run.sh eval OUT      # SmolLM2 from its parts (once per machine): kvwire eval, fp32 on CUDA, of
#                                   # PROFILES on the 24 tuning questions (TUNE=N: the first N from there; HELD_OUT=N: N of the held-out ones,
#                                   # from the SKIP-th), into OUT/eval.json and OUT/eval.txt
#   deploy/gpu/run.sh recompute OUT # issue 28's "KV against recompute" table alone (llama-3.1-8b-random, its basis fitted
#                                   # on the spot; no SmolLM2 needed), with the relay's and gRPC's loopback ceilings and the
#                                   # frontier codec rows, in about 9 minutes on an H100: CONTEXTS, RATES, FRONTIER (e.g.
#                                   # pca:b1.7:w:e:j:a,...), CODEC_TOKENS, MAX_ROW_S (skip a row predicted longer), BUDGET
#                                   # (s of table rows), LIMIT (s, the whole command), BASELINE (int4; '' for
#                                   # none), RANS_BATCH (the sender's rANS
#                                   # batch, symbols; KVWIRE_SPLIT_GEMM=0: pca:...:a's GEMMs in float32), RECEIVER_DEVICE
#                                   # (cuda:1 on a machine of two GPUs: the nodes on a GPU each);
#                                   # into OUT/bench_recompute.{json,txt}
#   deploy/gpu/run.sh bg NAME CMD   # CMD detached (setsid: it outlives the call, until the machine goes back), run
#                                   # from a copy of the tree in /tmp/tree/NAME (later calls replace the tree's files), its
#                                   # output in /tmp/bg/NAME.log and its exit status in /tmp/bg/NAME.done; CMD
#                                   # writes its files under /tmp/bg/NAME/. Lets a long GPU run go on while
#                                   # later calls move files (deploy/gpu/ship_qwen.sh)
#   deploy/gpu/run.sh collect OUT   # what the detached runs wrote so far, as OUT/bg.tar.gz, and their logs' tails
#   deploy/gpu/run.sh wait S NAME.. # block until the detached runs NAME.. end or S seconds pass (a call holds the
#                                   # machine for as long as it runs: one call of up to 590 s leaves no idle gap
#                                   # for the 30-second release, where back-to-back short calls need no local work
#                                   # in between), then collect into $OUT
#   python3 deploy/gpu/profile_wire.py OUT/profile_wire.json 32768   # (after install; PYTHONPATH as below) where
#                                   # wire.encode and wire.decode spend their time, cProfile, int4 and pca:b1:a
#   python3 deploy/gpu/first_token.py OUT/first_token.json 32768 131072   # (after install) the receiver's first
#                                   # token: the cache injected and one greedy token, timed and profiled
#   deploy/gpu/run.sh issue28 DIR   # the rANS codec (deploy/gpu/rans_gpu.py) and the recompute table, into DIR
#   deploy/gpu/session.sh OUT      # issue 28 and 30's session: timings side by side, then quality runs (its header)
#   deploy/gpu/run.sh tiny OUT      # without SmolLM2's weights (its tokenizer files in .tok/): the GPU
#                                   # tests on the tiny models, codec throughput, kvwire bench gpu
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 KVWIRE_CACHE_DIR=/tmp/kvwire-cache

smollm2() {  # join the parts, convert once into the cache, print the fingerprint and the shipped basis's
  mkdir -p /tmp/smollm2
  cat /tmp/parts/? > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf /tmp/kvwire-cache/models/smollm2-135m
  python3 -c "
from pathlib import Path
import common.models as models
models.GGUF_MODELS['smollm2-135m'] = lambda: Path('/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
loaded = models.load_model('smollm2-135m', 'cpu', 'float32')
print(loaded.fingerprint)
print('shipped basis:', loaded.codec_context.basis and loaded.codec_context.basis.digest)
"
}
case "$1" in
bg)  # from a copy of the tree: each device call copies the working tree afresh, and a file replaced while a
  # detached run imports it fails (a receiver's import of common.proto did, mid-run)
  name=$2
  shift 2
  mkdir -p "/tmp/bg/$name" "/tmp/tree/$name"
  tar --exclude=./.whl --exclude='./.qw*' --exclude='./.gp*' --exclude='./.basis*' -cf - . | tar -xf - -C "/tmp/tree/$name"
  cd "/tmp/tree/$name"
  export PYTHONPATH=/tmp/site:$PWD
  setsid nohup bash -c "$*; echo \$? > /tmp/bg/$name.done" > "/tmp/bg/$name.log" 2>&1 < /dev/null &
  echo "started $name (pid $!)"
  ;;
wait)
  limit=$2
  shift 2
  for _ in $(seq "$limit"); do
    left=0
    for name in "$@"; do [ -f "/tmp/bg/$name.done" ] || left=1; done
    [ "$left" = 0 ] && break
    sleep 1
  done
  "$0" collect "$OUT"
  ;;
collect)
  tar -czf "$2/bg.tar.gz" -C /tmp bg
  for log in /tmp/bg/*.log; do echo "== $log $(cat "${log%.log}.done" 2>/dev/null || echo running)"; tail -n 4 "$log"; done
  ;;
issue28)
  python3 deploy/gpu/rans_gpu.py "$2/rans_gpu.json" 4096 32768 2>&1 | tee "$2/rans_gpu.txt"
  CONTEXTS=${CONTEXTS:-4096,32768,131072} RATES=${RATES:-10gbit,1gbit,25gbit} \
    FRONTIER=${FRONTIER:-pca:b1:w:e:j:a,pca:b2:w:e:j:a} "$0" recompute "$2"
  ;;
part)
  mkdir -p /tmp/parts && cp "$2"/* /tmp/parts/
  ;;
wheels)
  mkdir -p /tmp/whl && cp "$2"/*.whl /tmp/whl/
  ;;
install)
  if [ -d .data ]; then mkdir -p /tmp/data && cp .data/* /tmp/data/; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls /tmp/whl/*.whl 2>/dev/null)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ;;
kernels)
  python3 -m pytest -q -p no:cacheprovider tests/gpu -k triton 2>&1 | tee "$2/gpu_kernel_tests.txt"
  python3 -c "
import json, sys
from channel.bench_gpu import codec_throughput, environment, wire_encode
rows = codec_throughput(4096) + codec_throughput(32768)
wire = [wire_encode(4096), wire_encode(32768)]
json.dump([environment()] + rows + wire, open(sys.argv[1], 'w'), indent=2)
for r in rows:
    print(r['tokens'], r['profile'], r['kernels'], r['launch'], 'copy %.0f GB/s  encode %.0f (x%.2f)  decode %.0f (x%.2f)' % (
        r['copy_gbps'], r['encode_gbps'], r['encode_vs_copy'], r['decode_gbps'], r['decode_vs_copy']))
for r in wire:
    print(r)
" "$2/codec_gpu.json" 2>&1 | tee "$2/codec_gpu.txt"
  ;;
crossdev)  # SmolLM2 and its basis (.basis/ carried once, copied to /tmp/kvwire-basis): the frontier's answers
  # across devices (CPU/GPU sender x CPU/GPU receiver), issue 28's correctness check
  [ -d /tmp/kvwire-cache/models/smollm2-135m ] && [ -f /tmp/kvwire-cache/models/smollm2-135m/model.safetensors ] || smollm2
  KVWIRE_BASIS_DIR=/tmp/kvwire-basis python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k across_devices 2>&1 \
    | grep -v "Loading weights" | tee "$2/gpu_tests_across_devices.txt"
  ;;
smollm2)
  smollm2
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "smollm2 or cpu_sender" 2>&1 | tee "$2/gpu_tests_smollm2.txt"
  ;;
metric)
  PICKS="${PROFILES:-pca:b1.05+pca:b1.9@13-24+text,pca:b2.2+pca:b3.6@13-24+text}"
  TUNE="--data /tmp/data/squad-v2-dev-public.json --skip 510 --samples 24"
  if [ -z "${HELD_OUT:-}" ]; then
    smollm2
    python3 -m channel.cli eval --device cuda --dtype float32 $TUNE --profiles "$PICKS" --json "$2/shipped.json" 2>&1 \
      | grep -v "Loading weights" | tee "$2/shipped.txt"
    python3 -m channel.cli calibrate --basis --metric --device cuda --dtype float32 --samples 128 \
      --data /tmp/data/squad-v2-dev-public.json --out /tmp/metric-basis 2>&1 | grep -v "Loading weights" | tee "$2/fit.txt"
  else
    TUNE="--samples 100"
  fi
  cp /tmp/metric-basis common/data/basis-smollm2-135m.safetensors  # this copy of the tree only
  python3 -m channel.cli eval --device cuda --dtype float32 $TUNE --profiles "$PICKS" --json "$2/metric.json" 2>&1 \
    | grep -v "Loading weights" | tee "$2/metric.txt"
  ;;
eval)
  [ -d /tmp/kvwire-cache/models/smollm2-135m ] || smollm2
  QUESTIONS="--data /tmp/data/squad-v2-dev-public.json --skip 510 --samples ${TUNE:-24}"
  [ -z "${HELD_OUT:-}" ] || QUESTIONS="--skip ${SKIP:-0} --samples ${HELD_OUT}"
  python3 -m channel.cli eval --device cuda --dtype float32 $QUESTIONS --profiles "$PROFILES" --json "$2/eval.json" 2>&1 \
    | grep -v "Loading weights" | tee "$2/eval.txt"
  ;;
tiny)
  mkdir -p /tmp/kvwire-cache/models/smollm2-135m && cp .tok/* /tmp/kvwire-cache/models/smollm2-135m/
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "not smollm2 and not cpu_sender and not triton" 2>&1 \
    | tee "$2/gpu_tests.txt"
  python3 -m channel.cli bench gpu --rates 1gbit,10gbit --json "$2/bench_gpu.json" 2>&1 | tee "$2/bench_gpu.txt"
  ;;
recompute)
  mkdir -p /tmp/kvwire-cache/models/smollm2-135m && cp .tok/* /tmp/kvwire-cache/models/smollm2-135m/ 2>/dev/null || true
  cli=(-m channel.cli)
  if [ -n "${RANS_BATCH:-}" ]; then  # the sender's rANS batch in symbols (common.wire.RANS_BATCH), for an A/B
    cli=(-c "import runpy, common.wire as w; w.RANS_BATCH = int('$RANS_BATCH'); runpy.run_module('channel.cli', run_name='__main__')")
  fi
  timeout "${LIMIT:-530}" python3 "${cli[@]}" bench gpu --sections recompute \
    --contexts "${CONTEXTS:-4096,32768,131072}" --rates "${RATES:-10gbit,25gbit,1gbit}" \
    --frontier "${FRONTIER:-pca:b2:w:e:j,pca:b1:w:e:j}" --codec-tokens "${CODEC_TOKENS:-32768}" \
    --max-row-s "${MAX_ROW_S:-40}" --budget-s "${BUDGET:-420}" --basis-dir /tmp/kvwire-basis \
    ${RECEIVER_DEVICE:+--receiver-device "$RECEIVER_DEVICE"} ${BASELINE+--baseline "$BASELINE"} \
    --json "$2/bench_recompute.json" 2>&1 | grep -v "Loading weights" | tee "$2/bench_recompute.txt"
  ;;
all)
  smollm2
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$2/gpu_tests.txt"
  python3 -m channel.cli bench gpu --json "$2/bench_gpu.json" 2>&1 | tee "$2/bench_gpu.txt"
  ;;
frontier)
  smollm2
  timeout "${LIMIT:-540}" python3 -m channel.cli frontier --device cuda --dtype float32 --tune-data /tmp/data/squad-v2-dev-public.json \
    --tune-skip 510 --tune-samples "${TUNE:-24}" --samples "${HELD_OUT:-110}" --json "$2/frontier_smollm2.json" \
    ${PROFILES:+--profiles "$PROFILES"} ${BASELINES:+--baselines "$BASELINES"} 2>&1 \
    | tee "$2/frontier_smollm2.txt"
  ;;
esac
