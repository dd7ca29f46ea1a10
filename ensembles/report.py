"""The run's report: ``RUN/report.html``, one self-contained page (pictures embedded) made from
the run folder alone.

    python -m ensembles.report RUN          # RUN: a run folder of distributed.tune

``distributed.tune`` writes it at the end of every run. On the page:

- the run: its settings, the cluster it ran on, the weights each member ran on, time spent;
- per class: members, ablations and ensemble on the test split and on validation, the fusion
  kept and why, whether it beats the best member, and a gallery of test images (ground truth,
  each member's map, the fused map), worst misses first;
- per study: the search history (validation score against epoch, trial and wall time; trials
  that early stopping ended are drawn hollow) and the hyper-parameter importances of Optuna's
  fANOVA evaluator on the study's history in ``RUN/optuna.journal``, with a slice view.

Plots are matplotlib figures saved as PNG: static pictures open anywhere with no script and no
network, and matplotlib is what Optuna's own plots draw with offline.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from anomaly_data.storage import is_file, is_uri, join, read_bytes, subfolders  # noqa: E402
from ensembles.ensemble import CONFIG_FILE as ENSEMBLE_FILE  # noqa: E402
from ensembles.ensemble import FusionChoice  # noqa: E402
from ensembles.evaluate import ENSEMBLE, GALLERY_FILE, METRICS, OVERLAY_DIR, RESULTS_FILE  # noqa: E402
from ensembles.fit import ABLATION_PREFIX  # noqa: E402
from ensembles.run_folder import (CONFIG_FILE, ENSEMBLE_DIR, OPTUNA_FILE, PROGRESS_FILE, RESUME_ONLY, TIMES_FILE,  # noqa: E402
                                  TRIALS_FILE, TUNE_DIR)

REPORT_FILE = "report.html"
FEW_TRIALS = 10  # below this many finished trials a study's importances are mostly noise
METRIC = "val_score"

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
tr.kept td { font-weight: bold; background: #eef6ee; }
img { max-width: 100%; vertical-align: top; }
figure { display: inline-block; margin: 0.3em; vertical-align: top; }
figcaption { font-size: 0.8em; }
.note { color: #444; font-size: 0.9em; }
.warn { color: #a40; }
nav a { margin-right: 1em; }
"""


# ----- reading the run folder ------------------------------------------------------------------
def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def tune_location(run_dir: Path, config: dict) -> str | Path:
    """Where Ray Tune wrote the trials: ``RUN/tune``, in the bucket when the run lives in one
    (Tune writes there directly; the run folder on this disk is a staging copy)."""
    recorded = config.get("args", {}).get("run_dir")
    return join(recorded, TUNE_DIR) if recorded and is_uri(recorded) else run_dir / TUNE_DIR


def trial_histories(tune_dir: str | Path) -> pd.DataFrame:
    """Every epoch every trial reported (Tune's ``result.json`` of each trial): study, trial id,
    epoch, the metric and the wall-clock time it was reported at."""
    rows = []
    for experiment in subfolders(tune_dir, "*"):
        for trial in subfolders(experiment, "*"):
            result = join(trial, "result.json")
            if not is_file(result):
                continue
            for line in read_bytes(result).decode().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption
                    continue
                if METRIC in r and r.get(RESUME_ONLY) != 1:  # not a checkpoint to resume from
                    rows.append({"study": r.get("config", {}).get("study"), "trial_id": r.get("trial_id"),
                                 "epoch": r.get("epoch", r.get("training_iteration")), METRIC: r[METRIC],
                                 "timestamp": r.get("timestamp")})
    return pd.DataFrame(rows, columns=["study", "trial_id", "epoch", METRIC, "timestamp"])


def optuna_history(run_dir: Path) -> optuna.storages.BaseStorage | None:
    """The run's Optuna journal, read once for every study."""
    path = run_dir / OPTUNA_FILE
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))) \
        if path.is_file() else None


def load_study(storage: optuna.storages.BaseStorage | None, key: str) -> optuna.Study | None:
    if storage is None:
        return None
    try:
        return optuna.load_study(study_name=key, storage=storage)
    except KeyError:  # the study was not searched with Optuna (e.g. a run of distributed.train)
        return None


# ----- pictures ----------------------------------------------------------------------------------
def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def figure_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buffer.getvalue())


def img(uri: str, alt: str, caption: str = "") -> str:
    tag = f'<img src="{uri}" alt="{html.escape(alt)}">'
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>" if caption else tag


# ----- the run -----------------------------------------------------------------------------------
def run_section(run_dir: Path, config: dict, results: pd.DataFrame, histories: pd.DataFrame) -> str:
    args = config.get("args", {})
    settings = pd.DataFrame({"option": list(args), "value": [json.dumps(v) if isinstance(v, (list, dict)) else v
                                                             for v in args.values()]})
    cluster = config.get("cluster", {})
    resources = {**{f"cluster {k}": v for k, v in cluster.items()}, **config.get("resources", {}),
                 "trials at a time": config.get("max_concurrent")}
    times = read_json(run_dir / TIMES_FILE, {})
    progress = read_json(run_dir / PROGRESS_FILE, {})
    spent = {"search wall time (s)": times.get("search_s", progress.get("wall_s")),
             "ensemble and test (s)": times.get("ensemble_s"), "whole run (s)": times.get("total_s"),
             "trial epochs reported": len(histories)}
    parts = ["<h2 id='run'>The run</h2>",
             f"<p>{html.escape(str(config.get('dataset', '?')))} data at {html.escape(str(config.get('root', '?')))}, "
             f"classes {html.escape(', '.join(config.get('classes', [])))}.</p>",
             "<h3>Time and resources</h3>", key_values({**spent, **resources})]
    if not results.empty:
        weights = results[results["class"] != "mean"].groupby("member")["weights"].first()
        weights = weights[[not m.startswith(ABLATION_PREFIX) for m in weights.index]]
        parts += ["<h3>Weights each member ran on</h3>",
                  "<p class='note'>random = no pretrained weights were available offline: such a member is far "
                  "from its paper's accuracy.</p>", key_values(weights.to_dict())]
    parts += ["<h3>Settings</h3>", settings.to_html(index=False, border=0)]
    return "\n".join(parts)


def key_values(values: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


# ----- per class ---------------------------------------------------------------------------------
def test_table(part: pd.DataFrame) -> str:
    shown = part.copy()
    shown["gap I"] = shown["image_auroc"] - shown["val_image_auroc"]
    shown["gap P"] = shown["pixel_auroc"] - shown["val_pixel_auroc"]
    columns = ["member", "weights", *METRICS, "val_image_auroc", "val_pixel_auroc", "gap I", "gap P"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for _, r in shown[columns].iterrows():
        kept = " class='kept'" if r["member"] == ENSEMBLE else ""
        body.append(f"<tr{kept}>" + "".join(f"<td>{html.escape(fmt(r[c]))}</td>" for c in columns) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def versus_best_member(part: pd.DataFrame) -> str:
    """Whether the kept ensemble beats, equals or trails the best single member on test."""
    members = part[~part["member"].str.startswith(ABLATION_PREFIX) & (part["member"] != ENSEMBLE)]
    ensemble = part[part["member"] == ENSEMBLE]
    if members.empty or ensemble.empty:
        return ""
    lines = []
    for metric, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        best = members.loc[members[metric].idxmax()]
        gain = float(ensemble[metric].iloc[0] - best[metric])
        verdict = "beats" if gain > 1e-9 else "equals" if abs(gain) <= 1e-9 else "trails"
        lines.append(f"{label}: the ensemble {verdict} the best member ({best['member']}, {best[metric]:.3f}) "
                     f"by {gain:+.3f}")
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def fusion_summary(fusion: dict) -> str:
    choice = FusionChoice(fusion["rule"], fusion["weights"], fusion["sigma"], fusion["image_rule"],
                          fusion["image_weights"])
    kept = fusion.get("validation", [{}])[-1]
    def weighted(weights: list[float]) -> str:
        return ", ".join(f"{m} {w:.2f}" for m, w in zip(fusion["members"], weights) if w > 0) or "-"

    lines = [f"kept: {choice.describe(fusion['members'])}; threshold {fusion['threshold']:.4g} on the image score",
             f"map weights: {weighted(choice.weights)}; image-score weights: "
             f"{weighted(choice.image_weights) if choice.image_rule == 'member_mix' else '- (the fused map maximum)'}",
             f"why: {kept.get('reason', '(not recorded)')}"]
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def validation_table(fusion: dict) -> str:
    rows = [{"member": r["name"], "val image AUROC": r.get("image_auroc"), "val pixel AUROC": r.get("pixel_auroc"),
             "val score": r.get("val_score"), "held-out kinds": r.get("held_out")}
            for r in fusion.get("validation", [])]
    return pd.DataFrame(rows).to_html(index=False, border=0, float_format=lambda x: f"{x:.3f}", na_rep="-")


def gallery(run_dir: Path, class_name: str) -> str:
    folder = run_dir / OVERLAY_DIR / class_name
    index = read_json(folder / GALLERY_FILE)
    if index is None:
        return "<p class='note'>no gallery (the test split was not evaluated)</p>"
    figures = []
    for entry in index["images"]:
        png = folder / entry["file"]
        if png.is_file():
            caption = (f"{entry['verdict'].replace('_', ' ')}: {entry['defect']}, score {entry['score']:.4g} "
                       f"(threshold {index['threshold']:.4g})")
            figures.append(img(data_uri(png.read_bytes()), f"{class_name} {entry['file']}", caption))
    note = ("<p class='note'>Each row: the image, its ground truth, each member's map and the fused map (each "
            "scaled within the image). Worst misses first: missed defects, then false alarms, at the ensemble's "
            "threshold; then one caught image per defect kind and a normal one.</p>")
    return note + "".join(f"<div>{f}</div>" for f in figures)


def class_section(run_dir: Path, class_name: str, results: pd.DataFrame, fusion: dict | None) -> str:
    parts = [f"<h2 id='class-{html.escape(class_name)}'>Class {html.escape(class_name)}</h2>"]
    part = results[results["class"] == class_name] if not results.empty else results
    if not part.empty:
        parts += ["<h3>Test split (and validation)</h3>", test_table(part), versus_best_member(part)]
    if fusion is not None:
        parts += ["<h3>The fusion</h3>", fusion_summary(fusion),
                  "<h3>Validation (held-out normals + synthetic defects)</h3>", validation_table(fusion)]
    parts += ["<h3>Gallery</h3>", gallery(run_dir, class_name)]
    return "\n".join(parts)


# ----- per study ---------------------------------------------------------------------------------
def whole_numbers(ax, first: int, last: int) -> None:
    """An x axis of epochs or trial numbers: whole-number ticks only, even for a single value."""
    ax.set_xlim(first - 0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def history_figure(study_key: str, history: pd.DataFrame, max_epochs: int | None, start: float) -> str:
    """Validation score against epoch, against trial (in start order) and against wall time; a
    trial that ended before ``max_epochs`` (stopped early) is drawn hollow."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    trials = history.sort_values("timestamp").groupby("trial_id", sort=False)
    order = history.groupby("trial_id")["timestamp"].min().sort_values().index
    stopped_any = False
    for number, trial_id in enumerate(order):
        t = trials.get_group(trial_id).sort_values("epoch")
        stopped = max_epochs is not None and t["epoch"].max() < max_epochs
        stopped_any |= stopped
        face = "none" if stopped else "C0"
        axes[0].plot(t["epoch"], t[METRIC], "-", color="C0", alpha=0.5)
        axes[0].plot(t["epoch"].iloc[-1:], t[METRIC].iloc[-1:], "o", mfc=face, color="C0")
        best = t[METRIC].max()
        axes[1].plot([number], [best], "o", mfc=face, color="C0")
        axes[2].plot([(t["timestamp"].iloc[-1] - start) / 60], [best], "o", mfc=face, color="C0")
    best_so_far = history.groupby("trial_id")[METRIC].max().reindex(order).cummax()
    axes[1].step(range(len(order)), best_so_far.values, where="post", color="C1", label="best so far")
    axes[1].legend(loc="lower right", fontsize=8)
    whole_numbers(axes[0], 1, max(int(history["epoch"].max()), max_epochs or 1))
    whole_numbers(axes[1], 0, len(order) - 1)
    for ax, xlabel in zip(axes, ("epoch", "trial (in start order)", "minutes since the search started")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC)
        ax.grid(alpha=0.3)
    stopped_note = "; hollow = ended before its last epoch (stopped by ASHA, or failed)" if stopped_any else ""
    fig.suptitle(f"{study_key}: validation score{stopped_note}", fontsize=10)
    return figure_uri(fig)


def importance_view(study: optuna.Study | None) -> str:
    """Optuna's fANOVA importances of the study's parameters, with a slice view; a note when the
    trials are too few or parameters are conditional (present in some trials only)."""
    if study is None:
        return "<p class='note'>no Optuna history for this study</p>"
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < 2:
        return f"<p class='note'>{len(finished)} finished trial(s): no importance can be computed</p>"
    everywhere = set.intersection(*(set(t.params) for t in finished))
    conditional = sorted(set.union(*(set(t.params) for t in finished)) - everywhere)
    notes = []
    if len(finished) < FEW_TRIALS:
        notes.append(f"only {len(finished)} finished trials: at this count the importances are mostly noise")
    if conditional:
        notes.append(f"conditional parameters, set in some trials only, are left out of the importances: "
                     f"{', '.join(conditional)} (the slice view shows them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as err:  # e.g. no parameter varies
            importances = {}
            notes.append(f"importances not computed: {err}")
        parts = [f"<p class='note warn'>{html.escape(n)}</p>" for n in notes]
        if importances:
            fig, ax = plt.subplots(figsize=(5, 0.35 * len(importances) + 1))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names], color="C2")
            ax.set_xlabel("fANOVA importance (share of the variance of val_score)")
            ax.set_title(f"{study.study_name}: hyper-parameter importances", fontsize=10)
            parts.append(img(figure_uri(fig), f"{study.study_name} importances"))
        with plt.style.context("default"):  # Optuna's plots switch the style; keep that to this one
            axes = optuna.visualization.matplotlib.plot_slice(study)
            first = np.atleast_1d(axes).flat[0]
            parts.append(img(figure_uri(first.figure), f"{study.study_name} slice view"))
    return "\n".join(parts)


def study_section(study: optuna.Study | None, key: str, history: pd.DataFrame, max_epochs: int | None,
                  start: float) -> str:
    parts = [f"<h3 id='study-{html.escape(key)}'>Study {html.escape(key)}</h3>"]
    if history.empty:
        parts.append("<p class='note'>no epoch was reported (the trials' Tune folders are not in the run folder)</p>")
    else:
        parts.append(img(history_figure(key, history, max_epochs, start), f"{key} search history"))
    parts.append(importance_view(study))
    return "\n".join(parts)


def studies_section(run_dir: Path, config: dict, histories: pd.DataFrame, trials: pd.DataFrame) -> str:
    specs = config.get("specs", {})
    keys = list(specs) or sorted(histories["study"].dropna().unique())
    start = float(histories["timestamp"].min()) if not histories.empty else 0.0
    parts = ["<h2 id='search'>The search</h2>"]
    if not trials.empty:
        counts = trials.groupby(["model", "classes"])["status"].value_counts().unstack(fill_value=0).reset_index()
        parts.append(counts.to_html(index=False, border=0))
    storage = optuna_history(run_dir)
    for key in keys:
        epochs = specs.get(key, {}).get("recipe", {}).get("epochs")
        parts.append(study_section(load_study(storage, key), key, histories[histories["study"] == key], epochs,
                                   start))
    return "\n".join(parts)


# ----- the page ----------------------------------------------------------------------------------
def write_report(run_dir: Path | str) -> Path:
    """Write ``RUN/report.html`` from the run folder and return its path."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG_FILE)
    if config is None:
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: give the folder of a distributed.tune run")
    results = read_csv(run_dir / RESULTS_FILE)
    trials = read_csv(run_dir / TRIALS_FILE)
    histories = trial_histories(tune_location(run_dir, config))
    ensemble = read_json(run_dir / ENSEMBLE_DIR / ENSEMBLE_FILE, {})
    fusions = ensemble.get("classes", {})
    classes = config.get("classes", [])
    nav = "".join(f"<a href='#class-{html.escape(c)}'>{html.escape(c)}</a>" for c in classes)
    body = [f"<h1>Run {html.escape(run_dir.resolve().name)}</h1>",
            f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
            f"{html.escape(str(run_dir.resolve()))}</p>",
            f"<nav><a href='#run'>the run</a>{nav}<a href='#search'>the search</a></nav>"]
    if not results.empty:
        mean = results[results["class"] == "mean"]
        body += ["<h2>Macro mean over classes (test split)</h2>", test_table(mean), versus_best_member(mean)]
    else:
        body.append("<p class='note'>no test-split results (the run stopped after the search, or failed)</p>")
    body.append(run_section(run_dir, config, results, histories))
    body += [class_section(run_dir, c, results, fusions.get(c)) for c in classes]
    body.append(studies_section(run_dir, config, histories, trials))
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Run "
            f"{html.escape(run_dir.resolve().name)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / REPORT_FILE
    out.write_text(page)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run folder of distributed.tune")
    a = p.parse_args(argv)
    try:
        print(write_report(a.run_dir))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
