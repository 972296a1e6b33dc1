#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, in one run (device time is minutes): the CUDA tests, then block-by-block
# compression of a random 1.57B LLaMA on the GPU (rsvd as in sequential_large.md; fwhiten + sensitivity, with tokens/s).
# Usage on the GPU machine, from the repository root: OUT=<folder> bash benchmarks/gpu_session.sh
# Writes $OUT/tests.log, $OUT/sequential_large_gpu_*.{json,md} and $OUT/env.txt.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LMSHRINK_NO_STATS_CACHE=1
OUT=${OUT:?set OUT to a folder for the results}
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; nproc; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_sequential.py tests/test_pipeline.py tests/test_joint.py tests/test_refit.py \
  tests/test_shards.py "tests/test_distributed.py::test_torchrun_on_one_gpu_joins_nccl_and_matches_one_process" \
  "tests/test_distributed.py::test_cuda_with_fewer_gpus_than_processes_is_refused_on_rank_0" 2>&1 | tee "$OUT/tests.log" | tail -25
timeout 150 python3 benchmarks/sequential_large.py --device cuda --method rsvd --windows 4 --name sequential_large_gpu_rsvd 2>&1 | tail -4
cp benchmarks/results/sequential_large_gpu_rsvd.* "$OUT/" 2>/dev/null
timeout 300 python3 benchmarks/sequential_large.py --device cuda --method fwhiten --allocation sensitivity --windows 8 --speed \
  --name sequential_large_gpu_fwhiten 2>&1 | tail -5
cp benchmarks/results/sequential_large_gpu_fwhiten.* "$OUT/" 2>/dev/null
ls "$OUT"
