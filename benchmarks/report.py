"""Rebuild every generated table and figure of docs/results.md from docs/data alone, with no training.

Each comparison record in ``docs/data/*.json`` (``benchmarks.records``; written by
``python -m benchmarks.compare SUITE``) becomes one block of the page between
``<!-- report:NAME:begin -->`` and ``<!-- report:NAME:end -->``: its tables with the interquartile mean
and mean of each method and their 95% stratified-bootstrap intervals, the difference to the suite's
first method with its interval and the only verdict the page may print ("above"/"below" when the
interval excludes 0 with at least 3 seeds a side, else "level"), the probability of improvement,
references at the same budget, return at equal training time where the suite asks for it, and a
plot with interval bands. A record without a block in the page gets one appended; text outside the
markers is never touched.

    python -m benchmarks.report            # rewrite the blocks and any figure whose data changed
    python -m benchmarks.report --check    # exit 1, with a diff, if the page or a figure is stale

A figure carries the hash of the data it was drawn from in its PNG metadata, so ``--check`` can tell a
stale figure without comparing pixels (which differ between matplotlib versions).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from benchmarks import records, stats
from utils.errors import UserError, exit_on_user_error
from utils.io import atomic_write_text

DEFAULT_RESULTS_MD = "docs/results.md"
RETURN = "episode/return"
#: Maximum episode return (one point per achievement): "% of max" and the performance profiles.
MAX_RETURN = {"Craftax-Symbolic-v1": 226.0, "Craftax-Pixels-v1": 226.0,
              "Craftax-Classic-Symbolic-v1": 22.0, "Craftax-Classic-Pixels-v1": 22.0}
HASH_KEY = "report-data-sha256"
#: Entry points that learn nothing (a floor to read the others against): their seconds would set the
#: equal-time budget at the cost of stepping the env alone, so the timing tables leave them out.
FLOORS = {"online_rl.random_policy"}
NEW_BLOCKS = "<!-- report:new-blocks -->"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- report:{name}:begin -->", f"<!-- report:{name}:end -->"


def verdict_text(diff, short: bool = False) -> str:
    """A difference's verdict as the page prints it: above, below, level, or no claim where either side has
    fewer seeds than a claim needs (``short`` leaves the reason out, for the narrow along-the-curve cells)."""
    if diff.verdict != "too few seeds":
        return diff.verdict
    return "no claim" if short else f"no claim (fewer than {stats.MIN_SEEDS_CLAIM} seeds)"


def replace_block(text: str, name: str, block: str) -> str:
    """``text`` with the named block replaced. A new block goes just before ``NEW_BLOCKS`` (the end of
    the page's headline section), or at the end of a page without that marker."""
    begin, end = markers(name)
    wrapped = f"{begin}\n{block.rstrip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        if end in text:
            raise UserError(f"results file has {end} without {begin}; fix the markers by hand")
        if NEW_BLOCKS in text:
            return text.replace(NEW_BLOCKS, f"{wrapped}\n\n{NEW_BLOCKS}", 1)
        return (text.rstrip() + "\n\n" if text.strip() else "") + wrapped + "\n"
    stop = text.find(end, start)
    if stop < 0:
        raise UserError(f"results file has {begin} without {end}; fix the markers by hand")
    return text[:start] + wrapped + text[stop + len(end):]


# ---------------------------------------------------------------------------------------------------
# Numbers of one env of a record
# ---------------------------------------------------------------------------------------------------


def final_scores(method: dict, metric: str = RETURN) -> np.ndarray:
    """Per-seed final value of ``metric`` for the seeds that have one."""
    values = [run["final"].get(metric) for run in method["runs"]]
    return np.array([v for v in values if v is not None], dtype=np.float64)


#: Episode values every env logs; the others (Tetris ``lines`` and ``pieces``) are the env's own.
COMMON_EPISODE_KEYS = ("episode/count", "episode/return", "episode/length")


def episode_metric_table(methods: dict[str, dict]) -> list[str]:
    """The env's own per-episode values (Tetris: lines a game), IQM over seeds with intervals and each
    method against the first: the figure comparable across rewards, where the return is not."""
    keys = sorted({k for m in methods.values() for run in m["runs"] for k in run["final"]
                   if k.startswith("episode/") and k not in COMMON_EPISODE_KEYS})
    if not keys:
        return []
    names = [k.removeprefix("episode/") for k in keys]
    lines = ["The env's own episode values (same window; IQM [95% CI] over seeds; against the first method: IQM "
             "difference and verdict):", "", "| method | " + " | ".join(names) + " |", "|---" * (len(keys) + 1) + "|"]
    first = next(iter(methods.values()))
    for i, (name, method) in enumerate(methods.items()):
        cells = []
        for key in keys:
            scores, base = final_scores(method, key), final_scores(first, key)
            text = estimate_text(scores, "IQM", i) if scores.size else "n/a"
            if i and scores.size and base.size:
                diff = stats.difference(scores, base, "IQM", seed=i)
                text += f"; {diff.estimate.text()} {verdict_text(diff, short=True)}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def eval_scores(method: dict) -> np.ndarray:
    values = [run.get("eval", {}).get("eval/return") for run in method["runs"]]
    return np.array([v for v in values if v is not None], dtype=np.float64)


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


def estimate_text(scores: np.ndarray, stat: str, seed: int) -> str:
    if scores.size == 0:
        return "n/a"
    if scores.size == 1:
        return f"{scores[0]:.2f} (one seed)"
    return stats.interval(scores, stat, seed=seed).text()


def cpu_seconds_per_seed(method: dict) -> float | None:
    processes = method.get("processes", [])
    cpu = [p.get("cpu_seconds") for p in processes]
    if not processes or any(c is None for c in cpu):
        return None
    return sum(cpu) / max(1, sum(len(p["seeds"]) for p in processes))


def seeds_text(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def main_table(env: str, methods: dict[str, dict], references: list[dict]) -> list[str]:
    best = MAX_RETURN.get(env)
    header = ["method", "seeds", "return IQM [95% CI]", "return mean [95% CI]", "per seed",
              "% of max (IQM)", "achievement rate IQM [95% CI]", "eval return (mean)", "env steps/seed",
              "CPU-s per seed"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, (name, method) in enumerate(methods.items()):
        scores = final_scores(method)
        if scores.size == 0:
            lines.append(f"| {name} | 0 | no finished run |" + " |" * (len(header) - 3))
            continue
        rates = final_scores(method, "achievement_rate")
        steps = {run.get("env_steps") for run in method["runs"]}
        incomplete = not all(run.get("complete") for run in method["runs"])
        evals = eval_scores(method)
        missing = len(method["runs"]) - scores.size
        row = [name, str(len(method["runs"])) + (f" ({missing} with no finished episode)" if missing else ""),
               estimate_text(scores, "IQM", i), estimate_text(scores, "mean", i),
               ", ".join(f"{v:.2f}" for v in scores),
               fmt(100 * stats.iqm(scores) / best, 1) + "%" if best else "n/a",
               estimate_text(rates, "IQM", i) if rates.size else "n/a",
               fmt(evals.mean()) if evals.size else "n/a",
               ", ".join(f"{s:,}" for s in sorted(s for s in steps if s)) + (" (incomplete)" if incomplete else ""),
               fmt(cpu_seconds_per_seed(method), 0)]
        lines.append("| " + " | ".join(row) + " |")
    for ref in references:
        if ref.get("env") == env:
            cells = [f"reference: {ref['label']}", "", fmt(ref["value"]), "", "", "", "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    sources = [f"{r['label']}: {r['source']}" for r in references if r.get("env") == env]
    if sources:
        lines += ["", "References (not re-run here): " + "; ".join(sources) + "."]
    return lines


def difference_table(methods: dict[str, dict]) -> list[str]:
    """Every method against the first (the suite's baseline), on the final return."""
    names = list(methods)
    if len(names) < 2:
        return []
    base_name = names[0]
    base = final_scores(methods[base_name])
    if base.size == 0:
        return []
    rows = []
    for i, name in enumerate(names[1:], 1):
        scores = final_scores(methods[name])
        if scores.size == 0:
            continue
        diff = stats.difference(scores, base, "IQM", seed=i)
        poi = stats.probability_of_improvement(scores, base, seed=i)
        word = verdict_text(diff)
        rows.append(f"| {name} | {diff.estimate.text()} | {poi.text()} | {word} |")
    if not rows:
        return []
    return [f"Each method against `{base_name}` (final return; IQM difference and P(method > {base_name}), "
            "stratified bootstrap 95% intervals over seeds):", "",
            f"| method | IQM difference [95% CI] | P(method > {base_name}) [95% CI] | verdict |", "|---|---|---|---|",
            *rows]


def value_at_seconds(run: dict, seconds: float) -> float | None:
    """The run's return at the last curve point it reached within ``seconds`` of training."""
    best = None
    for value, elapsed in zip(run["curve"].get(RETURN, []), run.get("train_seconds", [])):
        if elapsed is not None and elapsed <= seconds and value is not None:
            best = value
    return best


def median_total_seconds(method: dict) -> float | None:
    """The median over seeds of the training seconds each took for its whole budget."""
    finished = [run["train_seconds"][-1] for run in method["runs"] if run.get("train_seconds")
                and run["train_seconds"][-1] is not None]
    return float(np.median(finished)) if finished else None


def equal_time_table(methods: dict[str, dict]) -> list[str]:
    """Each method's return after as much training time as the fastest-finishing method needed: the
    equal-compute view that equal env steps hide (a world model spends far more per step)."""
    totals = {name: median_total_seconds(m) for name, m in methods.items()}
    totals = {name: t for name, t in totals.items() if t is not None}
    if len(totals) < 2:
        return []
    budget = min(totals.values())
    lines = [f"Equal training time: each method's return after {budget:,.0f} s of training per process "
             "(the median time the quickest method took for the whole budget; its last curve point reached "
             "within that time):", "", "| method | training s for the budget (median) | return at equal time, "
             "IQM [95% CI] | seeds with a point |", "|---|---|---|---|"]
    for i, (name, method) in enumerate(methods.items()):
        values = np.array([v for v in (value_at_seconds(run, budget) for run in method["runs"]) if v is not None])
        lines.append(f"| {name} | {fmt(totals.get(name), 0)} | {estimate_text(values, 'IQM', i)} | "
                     f"{values.size} of {len(method['runs'])} |")
    return lines


def equal_compute_table(methods: dict[str, dict], longer: dict[str, dict]) -> list[str]:
    """The methods given more env steps (a suite's ``budget_factor``) against the slowest method at the
    suite's budget, each read at that method's training time: what a cheap method does with the compute
    an expensive one spends on its budget."""
    totals = {name: median_total_seconds(m) for name, m in methods.items()}
    totals = {name: t for name, t in totals.items() if t is not None}
    if not totals or not longer:
        return []
    slow = max(totals, key=totals.get)
    # Every seed of the slowest method reads its own final point: the time its longest seed took.
    seconds = max(run["train_seconds"][-1] for run in methods[slow]["runs"]
                  if run.get("train_seconds") and run["train_seconds"][-1] is not None)
    lines = [f"Equal compute: each method's return after {seconds:,.0f} s of training per process (what the "
             f"longest seed of `{slow}`, the slowest method at the suite's budget, took; the last curve point "
             f"within that time) and its difference to `{slow}`:", "",
             "| method | env steps per seed | training s for its budget (median) | return at equal time, IQM "
             f"[95% CI] | difference to `{slow}` | seeds with a point |", "|---|---|---|---|---|---|"]
    base = np.array([v for v in (value_at_seconds(run, seconds) for run in methods[slow]["runs"]) if v is not None])
    for i, (name, method) in enumerate({slow: methods[slow], **longer}.items()):
        if not method["runs"]:
            lines.append(f"| {name} | {method.get('budget', 0):,} | not run yet | | | 0 |")
            continue
        values = np.array([v for v in (value_at_seconds(run, seconds) for run in method["runs"]) if v is not None])
        diff = ""
        if i and values.size and base.size:
            difference = stats.difference(values, base, "IQM", seed=i)
            diff = f"{difference.estimate.text()} {verdict_text(difference, short=True)}"
        steps = method.get("budget") or max((run.get("env_steps") or 0 for run in method["runs"]), default=0)
        lines.append(f"| {name} | {steps:,} | {fmt(median_total_seconds(method), 0)} | "
                     f"{estimate_text(values, 'IQM', i)} | {diff} | {values.size} of {len(method['runs'])} |")
    return lines


def time_target_table(methods: dict[str, dict], target: float) -> list[str]:
    """Against a wall-clock goal per training process: how long each process took for the whole budget
    (start-up, compiling and the final evaluation included) and what each seed had reached by the goal
    (its last curve point within that much training time)."""
    lines = [f"Against the goal of {target / 60:,.1f} min of wall time per training process (wall: the whole "
             "process, start-up, compiling and the final evaluation included; the return within the goal: each "
             "seed's last curve point within that much training time, compiling included):", "",
             "| method | seeds per process | wall min per process, median (range) | processes within the goal | "
             "return reached within the goal, IQM [95% CI] | seeds with a point |", "|---|---|---|---|---|---|"]
    for i, (name, method) in enumerate(methods.items()):
        processes = [p for p in method.get("processes", []) if p.get("wall_seconds") is not None]
        minutes = [p["wall_seconds"] / 60 for p in processes]
        wall = (f"{np.median(minutes):.1f} ({min(minutes):.1f}-{max(minutes):.1f})" if minutes else "-")
        per_process = sorted({len(p["seeds"]) for p in processes}) or ["-"]
        within = sum(p["wall_seconds"] <= target for p in processes)
        values = np.array([v for v in (value_at_seconds(run, target) for run in method["runs"]) if v is not None])
        lines.append(f"| {name} | {', '.join(map(str, per_process))} | {wall} | {within} of {len(processes)} | "
                     f"{estimate_text(values, 'IQM', i)} | {values.size} of {len(method['runs'])} |")
    return lines


def window_index(curve_steps: list[int], step: int) -> int:
    """The curve point whose window ``(previous point, point]`` holds ``step`` (the last one past the end)."""
    return min(int(np.searchsorted(curve_steps, step)), len(curve_steps) - 1)


def along_curve_table(methods: dict[str, dict], curve_steps: list[int], at_steps: list[int]) -> list[str]:
    """Every method at a few points of its learning curve, and its difference to the first method there:
    where a head start (a pretrained policy) survives, and where the curves meet. Each point is the first
    curve window from the asked env step on that holds a logged row."""
    names = list(methods)

    def logged(k: int) -> bool:
        return any(len(run["curve"].get(RETURN, [])) > k and run["curve"][RETURN][k] is not None
                   and np.isfinite(run["curve"][RETURN][k]) for m in methods.values() for run in m["runs"])

    # A run logs once per compiled chunk, so a window may hold no row: take the first window from the
    # asked step on that holds one.
    windows = sorted({next((k for k in range(window_index(curve_steps, s), len(curve_steps)) if logged(k)),
                           window_index(curve_steps, s)) for s in at_steps})
    edges = [0, *curve_steps]
    heads = [f"env steps {edges[k]:,}-{edges[k + 1]:,}" for k in windows]
    lines = ["Along the learning curve (the training return of the episodes that finished in each window of env "
             f"steps, IQM [95% CI] over seeds; below it, the difference to `{names[0]}` and its verdict):", "",
             "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(windows)]

    def at(method: dict, k: int) -> np.ndarray:
        values = [run["curve"].get(RETURN, [])[k] if len(run["curve"].get(RETURN, [])) > k else None
                  for run in method["runs"]]
        return np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)

    for i, name in enumerate(names):
        cells = []
        for k in windows:
            scores = at(methods[name], k)
            text = estimate_text(scores, "IQM", i)
            base = at(methods[names[0]], k)
            if i and scores.size and base.size:
                diff = stats.difference(scores, base, "IQM", seed=i)
                word = verdict_text(diff, short=True)
                text += f"<br>{diff.estimate.text()} {word}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_table(methods: dict[str, dict], curve_steps: list[int], at_steps: list[int],
                      keys: list[str]) -> list[str]:
    """The logged diagnostics a suite asked for, at a few points of training: the mean over seeds, then
    each seed's value. Not a comparison (no verdicts): what a hypothesis about the learning predicts."""
    present = [key for key in keys if any(key in run.get("diagnostics", {})
                                          for m in methods.values() for run in m["runs"])]
    if not present:
        return []
    windows = sorted({window_index(curve_steps, s) for s in (at_steps or [curve_steps[-1]])})
    edges = [0, *curve_steps]
    lines = ["Diagnostics (the mean over each window's training chunks; mean over seeds, then each seed):", "",
             "| metric | method | " + " | ".join(f"env steps {edges[k]:,}-{edges[k + 1]:,}" for k in windows)
             + " |", "|---|---|" + "---|" * len(windows)]
    for key in present:
        for name, method in methods.items():
            if not any(key in run.get("diagnostics", {}) for run in method["runs"]):
                continue  # a method that does not log it (PPO has no reward head)
            cells = []
            for k in windows:
                values = [run.get("diagnostics", {}).get(key, [])[k]
                          if len(run.get("diagnostics", {}).get(key, [])) > k else None for run in method["runs"]]
                finite = [v for v in values if v is not None and np.isfinite(v)]
                cells.append(f"{fmt(float(np.mean(finite)))} ({', '.join(fmt(v) for v in values)})" if finite
                             else "-")
            lines.append(f"| `{key}` | {name} | " + " | ".join(cells) + " |")
    return lines


def achievement_table(methods: dict[str, dict]) -> list[str]:
    methods = {name: m for name, m in methods.items() if final_scores(m).size}
    keys = sorted({k for m in methods.values() for run in m["runs"] for k in run["final"]
                   if k.startswith("achievements/")})
    if not keys:
        return []
    lines = ["| achievement (% of episodes, mean over seeds) | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for key in keys:
        cells = []
        for method in methods.values():
            values = final_scores(method, key)
            cells.append(float(values.mean()) if values.size else None)
        if all(c is not None and c == 0 for c in cells):
            continue
        lines.append(f"| {key.removeprefix('achievements/')} | " + " | ".join(fmt(c, 1) for c in cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------


def data_hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def figure_hash(path: Path) -> str | None:
    """The data hash a figure was drawn from (its PNG metadata), None for a missing or foreign file."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.text.get(HASH_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def _steps_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    from utils.plotting import label_env_steps

    label_env_steps(ax)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))  # short labels, few ticks: never collide


def plot_env(title: str, steps: list[int], methods: dict[str, dict], equal_compute: bool, path: Path,
             digest: str, references: list[dict] = (), longer: dict[str, dict] | None = None) -> None:
    """Return against env steps (mean over seeds, 95% bootstrap band), achievement rate, and with
    ``equal_compute`` return against training seconds. ``references`` that name their ``env_steps`` are
    drawn on the return panel, so a curve is read against the published one, not only a table cell.
    ``longer`` (methods with a budget of their own) appear only on the seconds panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [RETURN] + (["achievement_rate"] if any("achievement_rate" in run["curve"] for m in methods.values()
                                                     for run in m["runs"]) else [])
    panels += ["time"] if equal_compute else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, method in {**methods, **((longer or {}) if panel == "time" else {})}.items():
            key = RETURN if panel == "time" else panel
            curves = [run["curve"].get(key) for run in method["runs"] if run["curve"].get(key)]
            if not curves:
                continue
            values = np.array([[np.nan if v is None else v for v in c] for c in curves], dtype=np.float64).T
            mean, low, high = stats.curve_bands(values, seed=0)
            if panel == "time":
                seconds = np.array([[np.nan if s is None else s for s in run.get("train_seconds", [])]
                                    for run in method["runs"] if run["curve"].get(key)], dtype=np.float64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    x = np.nanmedian(seconds, axis=0)
            else:
                x = np.asarray(steps, dtype=np.float64)
            ok = np.isfinite(mean) & np.isfinite(x)
            line, = ax.plot(x[ok], mean[ok], marker="o" if ok.sum() < 5 else None, markersize=3,
                            label=f"{name} ({len(curves)} seeds)")
            ax.fill_between(x[ok], low[ok], high[ok], color=line.get_color(), alpha=0.2, linewidth=0)
        marks = sorted((r["env_steps"], r["value"]) for r in references) if panel == RETURN else []
        if marks:
            ax.plot(*zip(*marks), color="black", linestyle=":", marker="D", markersize=4,
                    label="reference (see the table)")
        if panel == "time":
            ax.set_xlabel("training seconds (median over seeds)")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))
        else:
            _steps_axis(ax)
        ax.set_ylabel("episode return" if panel != "achievement_rate" else "mean achievement success (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize="small")
    fig.suptitle(f"{title} (mean over seeds, 95% bootstrap band)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={HASH_KEY: digest})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# A record's block
# ---------------------------------------------------------------------------------------------------


def seed_role_text(record: dict) -> str:
    role = record.get("seed_role")
    if role == "report":
        return "reporting seeds: none of them was used to choose any preset"
    if role == "tuning":
        return "tuning seeds: the presets were chosen on these, so the figures are not an unbiased report"
    return "the seeds' role in tuning is not stated"


def render_record(record: dict, data_name: str) -> tuple[str, dict[str, tuple]]:
    """The block's markdown, and the figures it references: ``{relative path: plot arguments}``."""
    seeds = record.get("seeds", [])
    lines = [f"### {record.get('title') or 'Comparison `' + record['name'] + '`'}", ""]
    if record.get("description"):
        lines += [record["description"].strip(), ""]
    lines += [f"{record['budget']:,} env steps per seed; seeds {seeds_text(seeds)} ({seed_role_text(record)}). "
              f"Data: `docs/data/{data_name}`. Command:", "", "```bash", record["command"], "```", ""]
    if record.get("headline") and len(seeds) < stats.MIN_SEEDS_HEADLINE:
        lines += [f"**Not yet a headline table: {len(seeds)} seeds, {stats.MIN_SEEDS_HEADLINE} needed.**", ""]
    lines += ["Return: per seed, the episode-weighted mean over the last 10% of logged updates; IQM and mean "
              "over seeds with 95% stratified-bootstrap intervals (Agarwal et al., 2021). A method is "
              "\"above\" or \"below\" another only when the interval of the difference excludes 0 with at "
              "least 3 seeds a side; otherwise \"level\". CPU-s per seed: the training processes' CPU seconds "
              "over the seeds they trained.", ""]
    figures = {}
    for env, entry in record["envs"].items():
        # Methods with a budget of their own (budget_factor) meet the others only at equal training time.
        methods = {name: m for name, m in entry["methods"].items() if "budget" not in m}
        longer = {name: m for name, m in entry["methods"].items() if "budget" in m}
        learners = {name: m for name, m in methods.items() if m.get("module") not in FLOORS}
        machines = sorted({p.get("machine") for m in methods.values() for p in m.get("processes", [])
                           if p.get("machine")})
        commits = sorted({p.get("commit") for m in methods.values() for p in m.get("processes", [])
                          if p.get("commit")})
        lines += [f"#### {env}", "", f"Machine: {'; '.join(machines) or 'not recorded'}. "
                  f"Commit: {', '.join(c[:10] + ('+dirty' if c.endswith('+dirty') else '') for c in commits) or 'not recorded'}.",
                  "", *main_table(env, methods, record.get("references", [])), ""]
        for block in (difference_table(methods), episode_metric_table(methods),
                      equal_time_table(learners) if record.get("equal_compute") else [],
                      equal_compute_table(learners, longer),
                      time_target_table(methods, record["time_target_seconds"])
                      if record.get("time_target_seconds") else [],
                      along_curve_table(methods, record["curve_steps"], record["early_steps"])
                      if record.get("early_steps") else [],
                      diagnostics_table(methods, record["curve_steps"], record.get("early_steps", []),
                                        record.get("diagnostics", [])),
                      achievement_table(methods)):
            if block:
                lines += [*block, ""]
        if any(run["curve"] for m in methods.values() for run in m["runs"]):
            rel = f"figures/report_{record['name']}_{env}.png"
            title = f"{record['name']}: {env}"
            args = (title, record["curve_steps"], methods, bool(record.get("equal_compute")))
            marks = [r for r in record.get("references", []) if r["env"] == env and r.get("env_steps")]
            figures[rel] = (functools.partial(plot_env, references=marks, longer=longer), args,
                            data_hash(list(args) + ([marks] if marks else []) + ([longer] if longer else [])))
            lines += [f"![{record['name']} learning curves on {env}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n", figures


# ---------------------------------------------------------------------------------------------------
# Aggregates: methods across the tasks of several records, on a normalised score
# ---------------------------------------------------------------------------------------------------


def normalised_scores(aggregate: dict, loaded: dict[str, dict]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``{method: [runs, tasks]}`` of the final return as % of each env's maximum, over the tasks (record,
    env) of the aggregate that every method has run; each task keeps as many runs as its smallest method."""
    columns: dict[str, list[np.ndarray]] = {m: [] for m in aggregate["methods"]}
    tasks = []
    for name in aggregate["records"]:
        for env, entry in loaded.get(name, {"envs": {}})["envs"].items():
            if env not in MAX_RETURN:
                raise UserError(f"aggregate {aggregate['name']}: {env} has no maximum return to normalise by")
            found = {m: final_scores(entry["methods"][m]) for m in aggregate["methods"] if m in entry["methods"]}
            if len(found) < len(aggregate["methods"]) or min(v.size for v in found.values()) == 0:
                continue
            runs = min(v.size for v in found.values())
            for method, values in found.items():
                columns[method].append(100 * values[:runs] / MAX_RETURN[env])
            tasks.append(f"{name}: {env}")
    if not tasks:
        return {}, []
    runs = min(len(c) for cols in columns.values() for c in cols)
    return {m: np.stack([c[:runs] for c in cols], axis=1) for m, cols in columns.items()}, tasks


def plot_profile(title: str, scores: dict[str, list], path: Path, digest: str) -> None:
    """Performance profiles: the fraction of runs (over seeds and tasks) above each normalised score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(max(max(row) for row in values) for values in scores.values())
    thresholds = np.linspace(0, top * 1.05 + 1e-9, 101)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, values in scores.items():
        fraction, low, high = stats.performance_profile(np.array(values), thresholds, reps=500)
        line, = ax.plot(thresholds, fraction, label=method)
        ax.fill_between(thresholds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("normalised score τ (% of the maximum return)")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={HASH_KEY: digest})
    plt.close(fig)


def render_aggregate(aggregate: dict, loaded: dict[str, dict], data_name: str) -> tuple[str, dict[str, tuple]]:
    """One table over every task of the aggregate's records (IQM of the normalised score, intervals from
    the stratified bootstrap, which resamples seeds within each task) and a performance profile."""
    scores, tasks = normalised_scores(aggregate, loaded)
    missing = [name for name in aggregate["records"] if name not in loaded]
    lines = [f"### {aggregate['title']}", "", aggregate.get("description", "").strip(), "",
             f"Data: `docs/data/{data_name}` over the records {', '.join(f'`{r}`' for r in aggregate['records'])}"
             + (f"; not measured yet: {', '.join(f'`{r}`' for r in missing)}." if missing else "."), ""]
    if not tasks:
        return "\n".join(lines + ["No task has a finished run of every method yet."]) + "\n", {}
    runs = next(iter(scores.values())).shape[0]
    base_name = aggregate["methods"][0]
    lines += [f"Tasks: {'; '.join(tasks)}; {runs} seeds per task. Score: final return as % of the env's maximum.",
              "", f"| method | IQM [95% CI] | mean [95% CI] | P(method > {base_name}) [95% CI] | verdict |",
              "|---|---|---|---|---|"]
    for i, (method, values) in enumerate(scores.items()):
        if method == base_name:
            cells = ["", "(baseline)"]
        else:
            diff = stats.difference(values, scores[base_name], "IQM", seed=i)
            word = verdict_text(diff)
            cells = [stats.probability_of_improvement(values, scores[base_name], seed=i).text(), word]
        lines.append(f"| {method} | {stats.interval(values, 'IQM', seed=i).text()} | "
                     f"{stats.interval(values, 'mean', seed=i).text()} | " + " | ".join(cells) + " |")
    rel = f"figures/report_{aggregate['name']}_profile.png"
    args = (aggregate["title"], {m: v.tolist() for m, v in scores.items()})
    lines += ["", f"![{aggregate['name']} performance profiles]({rel})"]
    return "\n".join(lines) + "\n", {rel: (plot_profile, args, data_hash(list(args)))}


def table_cell(value, digits: int) -> str:
    """A plain value, or the median and range of repeated measurements (a list)."""
    if isinstance(value, list):
        values = [v for v in value if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return fmt(values[0], digits)
        return f"{fmt(float(np.median(values)), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value, digits)
    return "-" if value is None else str(value)


def render_table(table: dict, data_name: str) -> str:
    """A measured table (``records.TABLE_SCHEMA``): its columns as given, with the machine, commit and
    command that produced it, so a figure on the page is never separated from how it was measured."""
    columns = table["columns"]
    repeats = {len(v) for row in table["rows"] for v in row.values() if isinstance(v, list)}
    lines = [f"### {table['title']}", ""]
    if table.get("description"):
        lines += [table["description"].strip(), ""]
    lines += ["| " + " | ".join(c["label"] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table["rows"]:
        lines.append("| " + " | ".join(table_cell(row.get(c["key"]), c.get("digits", 2)) for c in columns) + " |")
    spread = (f" Cells with repeats: median (min-max) of {', '.join(map(str, sorted(repeats)))} measurements."
              if repeats else "")
    commit = (table.get("commit") or "unknown")[:12]
    lines += ["", f"Measured on {table.get('machine') or 'an unrecorded machine'}, commit `{commit}`, by "
              f"`{table['command']}`; data: `docs/data/{data_name}`.{spread}"]
    return "\n".join(lines) + "\n"


def data_table(datasets: dict[str, dict]) -> list[str]:
    """What each task's data is, from its tier block: the scores above are relative to these returns."""
    if not datasets:
        return []

    def policy_text(policy: dict) -> str:
        update = f", update {policy['update']}" if policy.get("update") not in (None, "") else ""
        return f"{policy.get('name')}{update}: {fmt(policy.get('return'))}"

    lines = ["", "The data (returns measured when the tiers were built; the normalised score is 0 at the random "
             "and 100 at the expert return):", "",
             "| data | transitions | collected by (return) | data return | random return | expert return |",
             "|---|---|---|---|---|---|"]
    for task, data in datasets.items():
        lines.append(f"| {task} | {data.get('rows', 0):,} | {'; '.join(policy_text(p) for p in data['policies'])} | "
                     f"{fmt(data.get('data_return'))} | {fmt(data.get('random_return'))} | "
                     f"{fmt(data.get('expert_return'))} |")
    return lines


def settings_only(baseline: str) -> bool:
    """Whether an offline table's baseline names only settings (``augment=none``), not a method."""
    return "=" in baseline.split(" ", 1)[0]


def baseline_of(method: str, baseline: str) -> str:
    """The method ``method`` is compared with: ``baseline`` itself, or, where ``baseline`` names only settings
    (``augment=none``), ``method`` with those settings, so each algorithm is compared with itself off and on."""
    if not settings_only(baseline):
        return baseline
    wanted = dict(token.split("=", 1) for token in baseline.split(" "))
    algo, *tokens = method.split(" ")
    fields = [token.split("=", 1) for token in tokens]
    return " ".join([algo, *(f"{field[0]}={wanted[field[0]]}" if len(field) == 2 and field[0] in wanted else token
                             for token, field in zip(tokens, fields))])


def render_scores(document: dict, data_name: str) -> str:
    """Methods by task (``records.SCORES_SCHEMA``): each cell's IQM and mean with intervals over seeds,
    and each method against the baseline method of the same task, with the page's only verdicts."""
    base_name, metric = document["baseline"], document["metric"]
    own = settings_only(base_name)
    against = f"the same method with {base_name}" if own else f"`{base_name}`"
    short = f"its {base_name}" if own else base_name
    lines = [f"### {document['title']}", ""]
    if document.get("description"):
        lines += [document["description"].strip(), ""]
    role = ("Seeds used to choose settings: read as tuning, not as a result." if document.get("seed_role") == "tuning"
            else "")
    lines += [f"Metric: {metric}, the final evaluation of each trained seed. Against {against} on the same "
              "data: IQM difference and P(method > baseline), stratified bootstrap 95% intervals over seeds; "
              f"\"above\"/\"below\" only when the interval excludes 0 with at least {stats.MIN_SEEDS_CLAIM} seeds "
              "a side, else \"level\". " + role, "",
              f"| data | method | seeds | IQM [95% CI] | mean [95% CI] | IQM difference to {short} [95% CI] | "
              f"P(method > {short}) [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|"]
    seed = 0
    for task, methods in document["tasks"].items():
        for name, values in methods.items():
            seed += 1
            reference = baseline_of(name, base_name)
            base = np.asarray(methods.get(reference, []), dtype=np.float64)
            scores = np.asarray(values, dtype=np.float64)
            cells = [task, name, str(scores.size), estimate_text(scores, "IQM", seed), estimate_text(scores, "mean", seed)]
            if name == reference or base.size == 0:
                cells += ["(baseline)" if name == reference else "no baseline on this data", "", ""]
            else:
                diff = stats.difference(scores, base, "IQM", seed=seed)
                word = verdict_text(diff)
                cells += [diff.estimate.text(), stats.probability_of_improvement(scores, base, seed=seed).text(), word]
            lines.append("| " + " | ".join(cells) + " |")
    lines += data_table(document.get("datasets") or {})
    commit = (document.get("commit") or "unknown")[:12]
    lines += ["", f"Evaluated on {document.get('machine') or 'an unrecorded machine'}, commit `{commit}`; collected by "
              f"`{document['command']}`; data: `docs/data/{data_name}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------


def build(results_md: Path, data_dir: Path) -> tuple[str, dict[str, tuple]]:
    """The page with every record's and aggregate's block regenerated, and every figure they reference."""
    text = results_md.read_text() if results_md.exists() else ""
    all_figures: dict[str, tuple] = {}
    loaded = records.load_all(data_dir)
    for name, record in loaded.items():
        block, figures = render_record(record, f"{name}.json")
        text = replace_block(text, name, block)
        all_figures.update(figures)
    for name, aggregate in records.load_all(data_dir, records.AGGREGATE_SCHEMA).items():
        block, figures = render_aggregate(aggregate, loaded, f"{name}.json")
        text = replace_block(text, name, block)
        all_figures.update(figures)
    for name, table in records.load_all(data_dir, records.TABLE_SCHEMA).items():
        text = replace_block(text, name, render_table(table, f"{name}.json"))
    for name, document in records.load_all(data_dir, records.SCORES_SCHEMA).items():
        text = replace_block(text, name, render_scores(document, f"{name}.json"))
    return text, all_figures


def stale_figures(figures: dict[str, tuple], root: Path) -> list[str]:
    return [rel for rel, (_, _, digest) in figures.items() if figure_hash(root / rel) != digest]


def write(results_md: Path, data_dir: Path) -> list[str]:
    """Rewrite the page's blocks and redraw the figures whose data changed; returns the files written."""
    text, figures = build(results_md, data_dir)
    written = []
    if not results_md.exists() or results_md.read_text() != text:
        atomic_write_text(results_md, text)
        written.append(str(results_md))
    for rel in stale_figures(figures, results_md.parent):
        function, args, digest = figures[rel]
        function(*args, results_md.parent / rel, digest)
        written.append(rel)
    return written


def check(results_md: Path, data_dir: Path) -> list[str]:
    """Problems that ``write`` would fix: a diff of the page, stale figures, data over the size cap."""
    text, figures = build(results_md, data_dir)
    current = results_md.read_text() if results_md.exists() else ""
    problems = []
    if text != current:
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(results_md), "regenerated",
                                    lineterm="", n=1)
        problems.append("the page differs from its data:\n" + "\n".join(list(diff)[:80]))
    problems += [f"figure {rel} is missing or was drawn from other data" for rel in stale_figures(
        figures, results_md.parent)]
    size = records.total_size(data_dir)
    if size > records.MAX_DATA_BYTES:
        problems.append(f"{data_dir} holds {size:,} bytes, over the {records.MAX_DATA_BYTES:,} cap")
    return problems


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-md", default=DEFAULT_RESULTS_MD, help="the page (default %(default)s)")
    parser.add_argument("--data-dir", help="the records (default: data/ beside the page)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale")
    parser.add_argument("--out", help="write the regenerated page (and its figures) under this folder instead")
    args = parser.parse_args(argv)
    results_md = Path(args.results_md)
    data_dir = Path(args.data_dir) if args.data_dir else results_md.parent / "data"
    if not data_dir.is_dir():
        raise UserError(f"no data folder {data_dir}; pass --data-dir")
    if args.check:
        problems = check(results_md, data_dir)
        for problem in problems:
            print(problem)
        if problems:
            print("run: python -m benchmarks.report", file=sys.stderr)
        return 1 if problems else 0
    if args.out:
        out = Path(args.out) / results_md.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if results_md.exists():
            out.write_text(results_md.read_text())
        results_md = out
    for path in write(results_md, data_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

