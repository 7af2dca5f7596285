#!/usr/bin/env bash
# The GPU run recorded in results/gpu_*: on a CUDA machine without network, from the repository
# root, with the Python wheels kvwire needs in .whl/ and SmolLM2's GGUF file in parts under
# .gguf1/ .gguf2/ .gguf3/ (the file is larger than what one transfer to that machine carries).
#   deploy/gpu/run.sh install     # the wheels, into /tmp/site
#   deploy/gpu/run.sh kernels OUT # Triton kernels against torch, and codec throughput
#   deploy/gpu/run.sh all OUT     # SmolLM2 converted, every GPU test, kvwire bench gpu
#   deploy/gpu/run.sh smollm2 OUT # SmolLM2 from its GGUF parts: lossless on CUDA, CPU sender -> GPU receiver
#   deploy/gpu/run.sh tiny OUT    # without SmolLM2's weights (its tokenizer files in .tok/): the GPU
#                                 # tests on the tiny models, codec throughput, kvwire bench gpu
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 KVWIRE_CACHE_DIR=/tmp/kvwire-cache
case "$1" in
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ;;
kernels)
  python3 -m pytest -q -p no:cacheprovider tests/gpu -k triton 2>&1 | tee "$2/gpu_kernel_tests.txt"
  python3 -c "
import json, sys
from channel.bench_gpu import codec_throughput, environment
rows = [environment()] + codec_throughput(4096) + codec_throughput(32768)
json.dump(rows, open(sys.argv[1], 'w'), indent=2)
for r in rows[1:]:
    print(r['tokens'], r['profile'], r['kernels'], 'copy %.0f GB/s  encode %.0f (x%.2f)  decode %.0f (x%.2f)' % (
        r['copy_gbps'], r['encode_gbps'], r['encode_vs_copy'], r['decode_gbps'], r['decode_vs_copy']))
" "$2/codec_gpu.json" 2>&1 | tee "$2/codec_gpu.txt"
  ;;
smollm2)
  mkdir -p /tmp/smollm2
  cat .gguf1/a .gguf2/b .gguf3/c > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf /tmp/kvwire-cache/models/smollm2-135m
  python3 -c "
from pathlib import Path
import common.models as models
models.GGUF_MODELS['smollm2-135m'] = lambda: Path('/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
print(models.load_model('smollm2-135m', 'cpu', 'float32').fingerprint)
"
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "smollm2 or cpu_sender" 2>&1 | tee "$2/gpu_tests_smollm2.txt"
  ;;
tiny)
  mkdir -p /tmp/kvwire-cache/models/smollm2-135m && cp .tok/* /tmp/kvwire-cache/models/smollm2-135m/
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu -k "not smollm2 and not cpu_sender and not triton" 2>&1 \
    | tee "$2/gpu_tests.txt"
  python3 -m channel.cli bench gpu --rates 1gbit,10gbit --json "$2/bench_gpu.json" 2>&1 | tee "$2/bench_gpu.txt"
  ;;
all)
  mkdir -p /tmp/smollm2
  cat .gguf1/a .gguf2/b .gguf3/c > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "
from pathlib import Path
import common.models as models
models.GGUF_MODELS['smollm2-135m'] = lambda: Path('/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
print(models.load_model('smollm2-135m', 'cpu', 'float32').fingerprint)
"
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$2/gpu_tests.txt"
  python3 -m channel.cli bench gpu --json "$2/bench_gpu.json" 2>&1 | tee "$2/bench_gpu.txt"
  ;;
esac
