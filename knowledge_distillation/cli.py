"""Command line of the trainer: absl flags -> one frozen `TrainConfig` -> run.

The flags are defined in `flags.py` (shared with the quantizer's command
line); nothing imports this module.
"""

import dataclasses
import json
import logging
import os
import sys

from absl import flags as absl_flags

from knowledge_distillation import flags
from knowledge_distillation.util.logs import quiet_tensorflow_start, setup_logging

logger = logging.getLogger("knowledge_distillation")

PROG = "python -m knowledge_distillation"


def main(argv=None):
    """Entry point of `python -m knowledge_distillation`. Returns an exit code."""
    argv = list(sys.argv if argv is None else argv)
    fv = absl_flags.FlagValues()
    flags.define_trainer_flags(fv)
    config = flags.parse(fv, argv, PROG, to_config=flags.train_config)
    if isinstance(config, int):
        return config
    # Imported late: TensorFlow start-up should not delay --help or flag errors.
    quiet_tensorflow_start()
    from knowledge_distillation import compat, distribute, rundir, train

    try:
        # Only the chief logs into --output_dir (other workers: a folder of their own).
        log_dir = distribute.write_dir(config.distribute, config.output_dir)
        rundir.check_writable_dir(log_dir, "--output_dir")
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    setup_logging(log_dir, "train.log")

    logger.info("config: %s", json.dumps(dataclasses.asdict(config), sort_keys=True))
    multi_worker = distribute.plan_cluster(config.distribute).kind == distribute.MULTI_WORKER
    try:
        summary = train.run(config)
    except (ValueError, OSError, RuntimeError) as e:
        logger.error("%s", e)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if multi_worker:
            compat.end_multi_worker_process(1)
        return 1
    print(format_summary(summary))
    print(f"summary written to {os.path.join(config.output_dir, train.SUMMARY_FILE)}")
    if multi_worker:
        compat.end_multi_worker_process(0)
    return 0


def run():
    """Console-script entry point."""
    sys.exit(main())


def format_summary(summary):
    """The final summary as the lines the CLI prints."""
    rows = [("teacher", summary["teacher"]), ("scratch student", summary["scratch"]),
            ("distilled student", summary["distilled"])]
    lines = ["------------------ Summary ------------------"]
    for label, row in rows:
        lines.append(
            f"{label:<18} test accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
            f"  params {row['parameters']}"
        )
    gain = summary["distilled"]["accuracy"] - summary["scratch"]["accuracy"]
    lines.append(f"distillation gain over scratch: {gain * 100:+.2f} points")
    lines.append(f"distillation throughput: {summary['examples_per_sec'] or 0:.1f} examples/sec")
    lines.append(f"wall time: {summary['wall_time_sec']:.1f} s")
    return "\n".join(lines)
