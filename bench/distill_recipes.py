"""Which distillation recipe makes the student beat its scratch twin: seeds x recipes x epochs.

Every row runs the trainer (`python -m knowledge_distillation`) once per seed
with one teacher file (`--teacher_model`), so within a seed the scratch and
distilled students share initial weights, data order, augmentation and
schedule and differ only in the teacher signal. An augmented recipe's
scratch twin is trained with the same augmentation. Recipes:

| name | flags | scratch twin |
|---|---|---|
| `kd` | today's defaults: Hinton KD, alpha 0.1, T 10, cached logits | no augmentation |
| `kd_aug` | `--augment`, KD, the teacher per step | augmented |
| `fm` | `--augment --distillation_loss kl --alpha 0`, the teacher per step (function matching) | augmented |
| `fm_views` | as `fm`, with `--teacher_views K` | augmented |
| `dist` | `--distillation_loss dist --alpha 0.5`, cached logits | no augmentation |
| `dist_aug` | `--augment --distillation_loss dist --alpha 0.5`, per step | augmented |

`--augment_args` adds augmentation flags to every augmented recipe (e.g.
`--augment_mix=mixup`). Finished runs are re-read, not retrained, so a killed
sweep continues where it stopped (the killed run resumes from its last
finished epoch on the batches it would have had). Prints one JSON line: per student, recipe
and epoch count, the scratch and distilled accuracies per seed, their mean
and sd, the paired gains (mean, sd, min, t), phase wall times (the distilled
phase includes computing cached logits) and the ratio of each recipe's
distilled phase to the `kd` recipe's measured in the same run. `--finished_only`
reports what is already finished (points over fewer seeds are marked
`n=`; runs made with other settings are left out, naming them) and lists
the missing runs. `--plot`
writes a PNG of accuracy against epochs (needs matplotlib, not a project
dependency: `pip install matplotlib`).

    python bench/distill_recipes.py --teacher_model=R/default_s42/teacher.keras \
        --seeds=1,2,3,4,42 --recipes=kd,dist,fm_views,fm --students=mlp_student,seed_student
    python bench/distill_recipes.py --teacher_model=... --seeds=1,2,3 --recipes=kd,fm \
        --epochs=5,20,60 --plot=docs/distill_epochs.png
Reduced run (minutes): add `--train_size=4096 --test_size=2000`.
"""

import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher_model", None, "The trained teacher every run loads.")
flags.DEFINE_list("seeds", ["1", "2", "3", "4", "42"], "Seeds.")
flags.DEFINE_list("students", ["mlp_student"], "Zoo students.")
flags.DEFINE_list("recipes", ["kd", "dist", "fm_views", "fm"], "Recipes (see above).")
flags.DEFINE_list("epochs", ["5"], "Epoch counts.")
flags.DEFINE_integer("teacher_views", 4, "K of fm_views.")
flags.DEFINE_list("augment_args", [], "Extra flags of the augmented recipes.")
flags.DEFINE_list("extra_args", [], "Extra flags of every run.")
flags.DEFINE_integer("train_size", None, "First N training images.")
flags.DEFINE_integer("test_size", None, "First N test images.")
flags.DEFINE_string("output_root", "output/recipes", "Where the runs go.")
flags.DEFINE_string("plot", None, "PNG path: accuracy against epochs per recipe.")
flags.DEFINE_bool("finished_only", False,
                  "Report (and plot) only the runs already finished under --output_root; "
                  "list the missing ones instead of training them.")

AUGMENTED = {"kd_aug", "fm", "fm_views", "dist_aug"}


def twin_kind(recipe):
    """What the scratch twin trains on: fm_views' twin trains on the K cached views."""
    if recipe == "fm_views":
        return f"augmented, {FLAGS.teacher_views} fixed views"
    return "augmented" if recipe in AUGMENTED else "plain"


def recipe_args(name):
    table = {
        "kd": [],
        "kd_aug": ["--augment"],
        "fm": ["--augment", "--distillation_loss=kl", "--alpha=0"],
        "fm_views": ["--augment", "--distillation_loss=kl", "--alpha=0",
                     f"--teacher_views={FLAGS.teacher_views}"],
        "dist": ["--distillation_loss=dist", "--alpha=0.5"],
        "dist_aug": ["--augment", "--distillation_loss=dist", "--alpha=0.5"],
    }
    if name not in table:
        raise app.UsageError(f"--recipes: unknown recipe {name!r}; choose from {', '.join(table)}")
    return table[name] + (list(FLAGS.augment_args) if name in AUGMENTED else [])


def run_dir(student, recipe, epochs, seed):
    return os.path.join(FLAGS.output_root, student, f"{recipe}_e{epochs}", f"s{seed}")


def trainer_args(student, recipe, epochs, seed):
    args = [f"--student={student}", f"--epoch={epochs}", f"--seed={seed}",
            f"--teacher_model={FLAGS.teacher_model}",
            f"--output_dir={run_dir(student, recipe, epochs, seed)}",
            *recipe_args(recipe), *FLAGS.extra_args]
    for name in ("train_size", "test_size"):
        if FLAGS[name].value:
            args.append(f"--{name}={FLAGS[name].value}")
    return args


def finished(student, recipe, epochs, seed):
    """None when the run has not finished; else how the settings it recorded differ from
    the ones these flags give it (the trainer's own comparison): [] when they agree."""
    out = run_dir(student, recipe, epochs, seed)
    if not os.path.isfile(os.path.join(out, "summary.json")):
        return None
    from knowledge_distillation import flags as kd_flags
    from knowledge_distillation import rundir

    fv = flags.FlagValues()
    kd_flags.define_trainer_flags(fv)
    fv(["distill_recipes", *trainer_args(student, recipe, epochs, seed)])
    with open(os.path.join(out, rundir.RUN_FILE), encoding="utf-8") as f:
        recorded = json.load(f)["settings"]
    return rundir.differences(recorded, rundir.deciding_settings(kd_flags.train_config(fv)))


def run_one(student, recipe, epochs, seed):
    out = run_dir(student, recipe, epochs, seed)
    args = [sys.executable, "-m", "knowledge_distillation",
            *trainer_args(student, recipe, epochs, seed)]
    start = time.perf_counter()
    if not FLAGS.finished_only:
        done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"run failed ({done.returncode}): {' '.join(args)}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    distilled = summary["distilled"]
    row = {
        "seed": seed, "scratch": summary["scratch"]["accuracy"],
        "distilled": distilled["accuracy"],
        "scratch_sec": summary["scratch"].get("training_time_sec"),
        "distilled_sec": (distilled.get("training_time_sec") or 0)
        + (distilled.get("teacher_cache_sec") or 0),
        "teacher_feed": distilled.get("teacher_feed"),
        "process_sec": None if FLAGS.finished_only else time.perf_counter() - start,
    }
    print(f"{student} {recipe} e{epochs} s{seed}: scratch {row['scratch']:.4f} distilled "
          f"{row['distilled']:.4f} ({row['distilled_sec']:.0f} s)", file=sys.stderr, flush=True)
    return row


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarise(rows):
    gains = [100 * (r["distilled"] - r["scratch"]) for r in rows]
    g_mean, g_sd = mean_sd(gains)
    s_mean, s_sd = mean_sd([100 * r["scratch"] for r in rows])
    d_mean, d_sd = mean_sd([100 * r["distilled"] for r in rows])
    t = g_mean / (g_sd / math.sqrt(len(gains))) if g_sd else None
    return {"n": len(rows), "scratch_mean": s_mean, "scratch_sd": s_sd, "distilled_mean": d_mean,
            "distilled_sd": d_sd, "gain_mean": g_mean, "gain_sd": g_sd, "gain_min": min(gains),
            "gain_t": t, "gains": gains,
            "distilled_sec_mean": mean_sd([r["distilled_sec"] for r in rows])[0],
            "scratch_sec_mean": mean_sd([r["scratch_sec"] for r in rows])[0]}


def plot(results, path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (not a project dependency): "
                         "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)

    def draw(ax, points, label, style):
        """points: [(epochs, summary, kind)]: mean and sd, `n=` where fewer seeds than asked."""
        xs = [int(e) for e, _, _ in points]
        means = [summary[f"{kind}_mean"] for _, summary, kind in points]
        line = ax.errorbar(xs, means, yerr=[summary[f"{kind}_sd"] for _, summary, kind in points],
                           marker="o", capsize=3, label=label, linestyle=style)
        for x, m, (_, summary, _) in zip(xs, means, points):
            if summary["n"] < len(FLAGS.seeds):
                ax.annotate(f"n={summary['n']}", (x, m), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=line[0].get_color())

    for ax, (student, recipes) in zip(axes[0], results.items()):
        twins = {}  # twin kind -> epochs -> the summary over the most seeds
        for recipe, by_epoch in recipes.items():
            epochs = sorted(by_epoch, key=int)
            draw(ax, [(e, by_epoch[e]["summary"], "distilled") for e in epochs],
                 f"{recipe} (distilled)", "-")
            for e in epochs:
                best = twins.setdefault(twin_kind(recipe), {}).get(e)
                if best is None or by_epoch[e]["summary"]["n"] > best["n"]:
                    twins[twin_kind(recipe)][e] = by_epoch[e]["summary"]
        for twin, by_epoch in twins.items():
            draw(ax, [(e, by_epoch[e], "scratch") for e in sorted(by_epoch, key=int)],
                 f"scratch ({twin})", "--")
        ax.set_xscale("log")
        ax.set_xticks(sorted({int(e) for r in recipes.values() for e in r}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.1)
        ax.set_xlabel("epochs")
        ax.set_ylabel("test accuracy (%), mean and sd over seeds")
        ax.set_title(f"{student}, teacher {os.path.basename(FLAGS.teacher_model)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fashion-MNIST, seeds {','.join(FLAGS.seeds)}; {common.machine()['cpu']}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv):
    del argv
    for recipe in FLAGS.recipes:
        recipe_args(recipe)  # an unknown recipe is a usage error in every mode
    if not FLAGS.finished_only and not (FLAGS.teacher_model
                                        and os.path.exists(FLAGS.teacher_model)):
        raise app.UsageError(f"--teacher_model: no such file {FLAGS.teacher_model!r}; train one "
                             "with python -m knowledge_distillation and pass its teacher.keras")
    results, missing, stale = {}, [], []
    for student in FLAGS.students:
        for epochs in FLAGS.epochs:
            for recipe in FLAGS.recipes:
                seeds = FLAGS.seeds
                if FLAGS.finished_only:
                    state = {s: finished(student, recipe, epochs, s) for s in FLAGS.seeds}
                    seeds = [s for s in FLAGS.seeds if state[s] == []]
                    missing += [run_dir(student, recipe, epochs, s)
                                for s in FLAGS.seeds if state[s] is None]
                    stale += [f"{run_dir(student, recipe, epochs, s)}: {', '.join(state[s])}"
                              for s in FLAGS.seeds if state[s]]
                    if not seeds:
                        continue
                rows = [run_one(student, recipe, epochs, seed) for seed in seeds]
                entry = results.setdefault(student, {}).setdefault(recipe, {})
                entry[epochs] = {"rows": rows, "summary": summarise(rows)}
        for epochs in FLAGS.epochs:
            base = results.get(student, {}).get("kd", {}).get(epochs)
            for recipe, by_epoch in results.get(student, {}).items():
                if base and epochs in by_epoch:
                    # Over the seeds both have (all of them, unless --finished_only).
                    kd = {r["seed"]: r["distilled_sec"] for r in base["rows"]}
                    pairs = [(r["distilled_sec"], kd[r["seed"]])
                             for r in by_epoch[epochs]["rows"] if r["seed"] in kd]
                    if pairs and sum(b for _, b in pairs):
                        by_epoch[epochs]["summary"]["distilled_sec_vs_kd"] = (
                            sum(a for a, _ in pairs) / sum(b for _, b in pairs))
    if stale:
        print(f"--finished_only: {len(stale)} finished run(s) made with other settings, left "
              "out: " + "; ".join(stale), file=sys.stderr)
    if missing:
        print(f"--finished_only: {len(missing)} run(s) not finished, left out: "
              + ", ".join(missing), file=sys.stderr)
    if not results:
        raise SystemExit("no finished runs under --output_root")
    if FLAGS.plot:
        plot(results, FLAGS.plot)
    common.emit({"bench": "distill_recipes", "machine": common.machine(),
                 "teacher_model": FLAGS.teacher_model,
                 "seeds": FLAGS.seeds, "train_size": FLAGS.train_size,
                 "augment_args": FLAGS.augment_args, "missing": missing, "stale": stale,
                 "results": results})


if __name__ == "__main__":
    app.run(main)
