#!/bin/bash
# ModelZoo performance run, 1 device, static shapes (every batch full, in
# training and evaluation): one epoch of at most 100 steps per model,
# reported as the ${Network}_bs${BatchSize}_1p_perf case.
#   bash test/train_performance_1p_static_eval.sh --data_path=DIR [--key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kd_launch perf train_performance_1p_static_eval \
    --epoch=1 --teacher_epoch=1 --max_steps=100 --static=True -- "$@"
