"""Logging set-up of the command lines: one format, to stdout and optionally a file."""

import logging
import os
import sys
import tempfile
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(output_dir=None, filename=None):
    """Logs INFO and up to stdout and, given both arguments, to OUTPUT_DIR/filename."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(FORMAT, "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if output_dir and filename:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename))
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    # TensorFlow 2.6 gives its logger a stderr handler of its own, which
    # printed each of its records a second time.
    tf_logger = logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)


# What TensorFlow's native libraries print to stderr while they load, before
# any of our lines: start-up notices, not problems. Anything else printed
# then is passed on.
_START_UP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "Could not find cuda drivers on your machine",
    "TF-TRT Warning: Could not find TensorRT",
)


class _FalseWarnings(logging.Filter):
    """Drops two false TensorFlow warnings.

    "triggered tf.function retracing": Keras builds a new `tf.function` for
    every model's fit, evaluate and predict; each is traced once, but
    TensorFlow counts the first traces of all functions built from Keras' one
    closure together, and after five it warns of retracing that is not
    happening (seen: "5 out of the last 5 calls to <function
    TensorFlowTrainer._make_function.<locals>.multi_step_on_iterator at
    0x...>", a different address each time). A real retrace (a shape that
    changes between steps) is what `--static` checks.

    "Compiled the loaded model, but the compiled metrics have yet to be
    built": Keras 2.6 says so when it saves a model that was never compiled
    itself, as the distilled student is (it trains inside the Distiller).
    """

    FALSE = ("triggered tf.function retracing",
             "Compiled the loaded model, but the compiled metrics have yet to be built")

    def filter(self, record):
        message = record.getMessage()
        return not any(text in message for text in self.FALSE)


def quiet_tensorflow_start():
    """Imports TensorFlow and Keras without their native start-up notices. Entry points only.

    Sets `TF_CPP_MIN_LOG_LEVEL=3` (unless set), which silences TensorFlow's
    later C++ INFO, WARNING and ERROR lines: every error that stops a run
    reaches Python as an exception and is reported once, as one line, while
    the C++ log repeats it (e.g. grappler's "remapper failed: ..." around a
    corrupt image on AVX-512 CPUs). `TF_CPP_MIN_LOG_LEVEL=0` shows them all.
    The lines printed while the native libraries load come before that
    setting is read, so stderr is captured for the import and replayed
    without the known notices.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow  # noqa: F401

                import knowledge_distillation.compat  # noqa: F401  (imports Keras)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                text = captured.read().decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip() and not any(noise in line for noise in _START_UP_NOISE):
                print(line, file=sys.stderr)
    import tensorflow as tf

    # The pipelines are shuffled (seeded) by data.make_dataset; Keras warns
    # that fit's own shuffle flag does not apply to a tf.data.Dataset.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed", category=UserWarning)
    tf.get_logger().addFilter(_FalseWarnings())
    logging.getLogger("tensorflow").addFilter(_FalseWarnings())
