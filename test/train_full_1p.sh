#!/bin/bash
# ModelZoo full training, 1 device: the trainer's whole run (teacher, scratch
# and distilled students), reported as the ${Network}_bs${BatchSize}_1p_acc case.
#   bash test/train_full_1p.sh --data_path=/usr/share/datasets/fashion-mnist [--key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kd_launch acc train_full_1p -- "$@"
