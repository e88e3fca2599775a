#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no broker there): the operators' contract suite on CUDA, then
# CPU/CUDA parity and throughput of the real operator path.  Usage there: bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=.
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# tests/conftest.py needs confluent-kafka (absent there): stop conftest discovery at tests/operators.
timeout 240 python3 -m pytest tests/operators operators -q -p no:cacheprovider --confcutdir=tests/operators \
  -o addopts="--doctest-modules" 2>&1 | tail -n 15 | tee "$OUT/pytest.txt"
timeout 200 python3 benchmarks/operator_devices.py --devices 1000000 --events-per-device 4 --batch 1000000 \
  --skip-cpu 2>&1 | tail -n 14 | tee "$OUT/operator_1m.txt"
timeout 120 python3 benchmarks/operator_devices.py --devices 100000 --events-per-device 8 --batch 200000 \
  2>&1 | tail -n 14 | tee "$OUT/operator_100k.txt"
