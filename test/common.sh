# Shared body of the ModelZoo launch scripts in this folder; sourced, not run.
#
# A launch script calls
#     kd_launch KIND RUN_NAME [SCRIPT_FLAG ...] -- "$@"
# KIND is "acc" (full training) or "perf" (bounded performance run);
# SCRIPT_FLAGS are the script's own trainer flags, which the user's flags
# override (absl keeps the last value of a repeated flag).
#
# It runs `python -m knowledge_distillation` from the repository root with the
# trainer's stdout and stderr in test/output/$ASCEND_DEVICE_ID/train_$ASCEND_DEVICE_ID.log,
# reads the figures from the trainer's own summary.json, prints ModelZoo's
# "Final result" block and writes test/output/$ASCEND_DEVICE_ID/${CaseName}.log.
# It exits non-zero when the arguments are wrong or training fails.

KD_NETWORK="knowledge_distillation_ID2517_for_TensorFlow2.X"
KD_RANK_SIZE=1
KD_DEFAULT_BATCH_SIZE=32
KD_TEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KD_REPO_ROOT="$(dirname "$KD_TEST_DIR")"
# Trainer flags naming files or folders: relative values given on the command
# line are taken relative to the caller's folder, since the trainer runs from
# the repository root.
KD_PATH_FLAGS=" data_path output_dir teacher_model student_model over_dump_path data_dump_path profiling_dump_path mixlist_file fusion_off_file "

kd_usage() {
    cat <<EOF
usage: bash $1 --data_path=DIR [--key=value ...]

Runs the knowledge-distillation trainer (python -m knowledge_distillation)
as a ModelZoo 1p $2 case and reports its figures.

  --data_path=DIR   folder with mnist.npz or the four MNIST IDX files
                    (or the tfds data_dir with --dataset=tfds:NAME); required
  --key=value       any trainer flag, e.g. --epoch=5 --batch_size=32
                    --precision_mode=allow_mix_precision --over_dump=True
                    --data_dump_flag=True --profiling=True --static=True;
                    see: python -m knowledge_distillation --help
  -h, --help        show this help

This script passes: ${3:-nothing beyond --data_path, --output_dir and --batch_size}
(your flags come later and win). Relative paths are relative to the current folder.

Outputs, under test/output/\$ASCEND_DEVICE_ID/ (ASCEND_DEVICE_ID defaults to 0):
  train_\$ASCEND_DEVICE_ID.log  the trainer's stdout and stderr
  $4/  the run: models, checkpoints, logs, summary.json
  \${CaseName}.log  the key = value report
EOF
}

kd_error() {
    echo "$KD_SCRIPT: error: $*" >&2
}

# kd_flag_value NAME DEFAULT FLAG... : the last --NAME=VALUE among FLAGS.
kd_flag_value() {
    local name="$1" value="$2" flag
    shift 2
    for flag in "$@"; do
        case "$flag" in
            --"$name"=*) value="${flag#--"$name"=}" ;;
        esac
    done
    printf '%s' "$value"
}

# kd_read_summary PATH : prints "examples_per_sec train_accuracy train_loss".
kd_read_summary() {
    "$KD_PYTHON" -c '
import json, math, sys

path = sys.argv[1]
try:
    with open(path) as f:
        summary = json.load(f)
except (OSError, ValueError) as e:
    sys.exit(f"cannot read {path}: {e}")
figures = []
for key in ("examples_per_sec", "train_accuracy", "train_loss"):
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        sys.exit(f"{path}: {key} is {value!r}; expected a finite number")
    figures.append(value)
if figures[0] <= 0:
    sys.exit(f"{path}: examples_per_sec is {figures[0]!r}; expected > 0")
print(*figures)
' "$1"
}

kd_launch() {
    local kind="$1" run_name="$2"
    shift 2
    local script_flags=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        script_flags+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift  # the "--"
    KD_SCRIPT="$run_name.sh"
    KD_PYTHON="${PYTHON:-python3}"
    # A relative path is taken from where the script started (it runs from the repo root).
    case "$KD_PYTHON" in */*) KD_PYTHON="$(cd "$(dirname "$KD_PYTHON")" && pwd)/$(basename "$KD_PYTHON")" ;; esac

    local data_path="" user_flags=() arg name value
    for arg in "$@"; do
        case "$arg" in
            -h | --help)
                kd_usage "test/$KD_SCRIPT" "$kind" "${script_flags[*]}" "$run_name"
                return 0
                ;;
            --?*)
                name="${arg#--}"
                name="${name%%=*}"
                value=""
                if [ "$arg" != "--$name" ]; then
                    value="${arg#--"$name"=}"
                    if [[ "$KD_PATH_FLAGS" == *" $name "* && -n "$value" && "$value" != /* ]]; then
                        value="$PWD/$value"
                    fi
                    arg="--$name=$value"
                fi
                if [ "$name" = "data_path" ]; then
                    if [ -z "$value" ]; then
                        kd_error "--data_path needs a folder: --data_path=DIR"
                        return 1
                    fi
                    data_path="$value"
                else
                    user_flags+=("$arg")
                fi
                ;;
            *)
                kd_error "unexpected argument '$arg'; flags take the form --key=value (see --help)"
                return 1
                ;;
        esac
    done
    if [ -z "$data_path" ]; then
        kd_error "--data_path=DIR is required (e.g. --data_path=/usr/share/datasets/fashion-mnist)"
        return 1
    fi
    if [ ! -d "$data_path" ]; then
        kd_error "--data_path=$data_path is not a folder"
        return 1
    fi

    local device_id="${ASCEND_DEVICE_ID:-0}"
    local out_dir="$KD_TEST_DIR/output/$device_id"
    local batch_size output_dir
    batch_size="$(kd_flag_value batch_size "$KD_DEFAULT_BATCH_SIZE" "${script_flags[@]}" "${user_flags[@]}")"
    output_dir="$(kd_flag_value output_dir "$out_dir/$run_name" "${script_flags[@]}" "${user_flags[@]}")"
    local train_log="$out_dir/train_$device_id.log"
    local summary="$output_dir/summary.json"
    mkdir -p "$out_dir" || return 1
    if [ "$output_dir" = "$out_dir/$run_name" ]; then
        # As ModelZoo's own scripts do: every run starts in a clean folder.
        rm -rf "$output_dir"
    fi
    # A folder given with --output_dir is the user's: the trainer resumes
    # there, or re-reports a finished run, and refuses other settings.

    echo "$KD_SCRIPT: training on $data_path (device $device_id), log: $train_log"
    local start end rc
    start=$(date +%s)
    (
        cd "$KD_REPO_ROOT" &&
            PYTHONPATH="$KD_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
                "$KD_PYTHON" -m knowledge_distillation \
                --data_path="$data_path" --output_dir="$output_dir" \
                --batch_size="$batch_size" "${script_flags[@]}" "${user_flags[@]}"
    ) >"$train_log" 2>&1
    rc=$?
    end=$(date +%s)
    if [ $rc -ne 0 ]; then
        tail -n 20 "$train_log" >&2
        kd_error "training failed with exit code $rc; full log: $train_log"
        return 1
    fi
    if [ ! -f "$summary" ]; then
        kd_error "training wrote no $summary; full log: $train_log"
        return 1
    fi
    local figures fps train_accuracy train_loss
    figures="$(kd_read_summary "$summary")" || {
        kd_error "no figures to report; full log: $train_log"
        return 1
    }
    read -r fps train_accuracy train_loss <<<"$figures"

    local case_name="${KD_NETWORK}_bs${batch_size}_${KD_RANK_SIZE}p_${kind}"
    local e2e_time=$((end - start))
    local actual_fps training_time accuracy loss
    actual_fps=$(awk -v v="$fps" 'BEGIN { printf "%.2f", v }')
    # ModelZoo's TrainingTime: milliseconds per training step.
    training_time=$(awk -v b="$batch_size" -v f="$fps" 'BEGIN { printf "%.2f", b * 1000 / f }')
    accuracy=$(awk -v v="$train_accuracy" 'BEGIN { printf "%.4f", v }')
    loss=$(awk -v v="$train_loss" 'BEGIN { printf "%.4f", v }')

    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : $actual_fps"
    echo "Final Train Accuracy : $accuracy"
    echo "E2E Training Duration sec : $e2e_time"

    {
        echo "Network = $KD_NETWORK"
        echo "RankSize = $KD_RANK_SIZE"
        echo "BatchSize = $batch_size"
        echo "DeviceType = $(uname -m)"
        echo "CaseName = $case_name"
        echo "ActualFPS = $actual_fps"
        echo "TrainingTime = $training_time"
        echo "TrainAccuracy = $accuracy"
        echo "ActualLoss = $loss"
        echo "E2ETrainingTime = $e2e_time"
    } >"$out_dir/$case_name.log"
}
