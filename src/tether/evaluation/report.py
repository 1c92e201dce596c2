"""The report: ``report.md`` and ``report.html`` (static, opens from disk) with PNG plots beside them.

Sections, each present or saying why it is missing:

1. a table comparing the policies on every evaluation metric (``tether.evaluation.evaluate``);
2. reward, gold score and KL per PPO iteration (rows of the PPO run's ``metrics.jsonl``);
3. the over-optimisation curve: gold and proxy reward against √KL across checkpoints, recentred on
   the starting policy, with the fitted ``R_RL(d) = d(α − β log d)`` (Gao et al. 2022);
4. best-of-N proxy and gold reward against the analytic KL bound ``log N − (N−1)/N``;
5. a length-vs-reward scatter (verbosity bias);
6. gold and proxy per round of iterated RLHF, and gold-vs-√KL for several KL coefficients
   (``tether study overoptimization``), when given;
7. sample responses side by side.

Every plot comes with one sentence computed from its numbers (the ``describe_*`` functions); no
claim is written in advance. Plots are drawn with matplotlib's object API on the Agg canvas, so
the report never touches a display or the global pyplot state.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tether.durable import atomic_file, write_text_atomic
from tether.evaluation.metrics import fit_rl, pearson, r_rl, rl_peak

PLOTS_DIR = "plots"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"

#: (label, metric key, format) rows of the comparison table
METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Reward-model score (proxy)", "reward/score", "{:+.3f}"),
    ("Gold score (simulated annotator)", "reward/gold", "{:+.3f}"),
    ("Gold gain over the first policy (paired by prompt, ± s.e.)", "gain/gold", "{:+.3f}"),
    ("Proxy gain over the first policy (paired by prompt, ± s.e.)", "gain/score", "{:+.3f}"),
    ("KL to reference (nats/response)", "kl/ref", "{:.2f}"),
    ("KL health", "kl/band", "{}"),
    ("Response length (tokens)", "response/length", "{:.1f}"),
    ("Response length (words)", "response/words", "{:.1f}"),
    ("Ended with the stop token", "response/stopped", "{:.0%}"),
    ("distinct-1", "diversity/distinct_1", "{:.3f}"),
    ("distinct-2", "diversity/distinct_2", "{:.3f}"),
    ("Repetition rate (word 3-grams)", "response/repetition", "{:.3f}"),
    ("Reward–length correlation (Pearson r)", "bias/reward_length_pearson", "{:+.2f}"),
    ("Reward–length correlation (Spearman ρ)", "bias/reward_length_spearman", "{:+.2f}"),
    ("Gold–length correlation (Pearson r)", "bias/gold_length_pearson", "{:+.2f}"),
    ("Factual probe accuracy", "probe/factual_accuracy", "{:.0%}"),
    ("Refusal rate, harmful requests", "probe/harmful_refusal_rate", "{:.0%}"),
    ("Refusal rate, benign controls", "probe/benign_refusal_rate", "{:.0%}"),
    ("Responses evaluated", "samples", "{:d}"),
)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def kl_band(kl: float | None) -> str | None:
    """Name of the health band of a KL to the reference (``tether.ppo.monitor.kl_band``)."""
    if kl is None or (isinstance(kl, float) and math.isnan(kl)):
        return None
    from tether.ppo.monitor import kl_band as monitor_band

    return monitor_band(kl).name.replace("_", " ")


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of ``key`` over rows that have it; x is ``step`` (or ``iteration``, else the row index)."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        y = _num(r.get(key))
        if y is None:
            continue
        x = _num(r.get("step", r.get("iteration", i)))
        xs.append(i if x is None else x)
        ys.append(y)
    return xs, ys


def _edge_means(values: Sequence[float]) -> tuple[float, float]:
    """Means of the first and last tenth (at least one value each)."""
    k = max(1, len(values) // 10)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def _fmt_signed(x: float) -> str:
    return f"{x:+.2f}"


def metrics_table(
    eval_metrics: Mapping[str, Mapping[str, Any]], gold_judge: str = "simulated annotator"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per metric, one column per policy) with formatted values; '–' = not measured.
    ``gold_judge`` names what gave the gold score in its row's label."""
    names = list(eval_metrics)
    rows = []
    for label, key, fmt in METRIC_ROWS:
        cells = [label.replace("simulated annotator", gold_judge) if key == "reward/gold" else label]
        for name in names:
            m = eval_metrics[name]
            if key == "kl/band":
                v = kl_band(_num(m.get("kl/ref")))
                cells.append(v if v is not None else ("≤ bound" if m.get("kl/bon_bound") is not None else "–"))
                continue
            if key == "kl/ref" and m.get("kl/ref") is None and m.get("kl/bon_bound") is not None:
                cells.append(f"≤ {float(m['kl/bon_bound']):.2f} (bound)")
                continue
            v = m.get(key)
            if key.startswith("gain/") and v is not None and _num(m.get(f"{key}_se")) is not None:
                cells.append(f"{v:+.3f} ± {m[f'{key}_se']:.3f}")
                continue
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                try:
                    cells.append(fmt.format(int(v) if fmt == "{:d}" else v))
                except (TypeError, ValueError):
                    cells.append(str(v))
        rows.append(cells)
    return ["Metric", *names], rows


# ---------------------------------------------------------------------------------------------
# sentences computed from the numbers
# ---------------------------------------------------------------------------------------------
def describe_ppo(rows: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    _, score = _series(rows, "reward/score")
    _, gold = _series(rows, "reward/gold")
    _, kl = _series(rows, "kl/ref")
    n = max(len(score), len(gold), len(kl))
    if score:
        a, b = _edge_means(score)
        parts.append(f"the proxy reward went from {a:+.2f} to {b:+.2f}")
    if gold:
        a, b = _edge_means(gold)
        parts.append(f"the gold score from {a:+.2f} to {b:+.2f}")
    if kl:
        _, end = _edge_means(kl)
        parts.append(f"the KL to the reference ended at {end:.2f} nats ({kl_band(end)}), peaking at {max(kl):.2f}")
    if not parts:
        return "The PPO metrics hold none of reward/score, reward/gold or kl/ref."
    return (
        f"Over {n} logged PPO iterations (first and last tenth averaged) "
        + ", ".join(parts[:-1])
        + (" and " if len(parts) > 1 else "")
        + parts[-1]
        + "."
    )


def _kl(point: Mapping[str, Any]) -> float:
    """KL of a point, clamped at 0: a per-batch k1 estimate near the start can come out slightly negative."""
    return max(0.0, float(point["kl"]))


def _by_kl(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Points in order of KL; a stable sort, so among points at KL 0 the earliest (the start) stays first."""
    return sorted(points, key=_kl)


def _sqrt_kl(points: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.sqrt([_kl(p) for p in points])


def _recentred(points: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """Values of ``key`` minus the value at the smallest-KL point (the starting policy; the first one on ties)."""
    if not points or any(_num(p.get(key)) is None for p in points):
        return None
    start = int(np.argmin([_kl(p) for p in points]))  # first of the smallest
    return np.array([float(p[key]) for p in points]) - float(points[start][key])


def _try_fit_rl(d: np.ndarray, r: np.ndarray) -> tuple[float, float] | None:
    try:
        alpha, beta = fit_rl(d, r)
    except (ValueError, np.linalg.LinAlgError):
        return None
    return (alpha, beta) if math.isfinite(alpha) and math.isfinite(beta) else None


def describe_overoptimisation(points: Sequence[Mapping[str, Any]]) -> str:
    """Where gold peaks along √KL, whether the proxy keeps rising past it, and the fitted peak.

    ``points`` come in training order (iterations, checkpoints). Past a gold peak, only points that
    also come later in training say what more training does: when every point of larger KL came
    earlier (the KL did not grow with training), the sentence says so instead of calling it
    over-optimisation. When the points carry ``gold_se`` (the standard error of their gold mean), a
    drop from the peak to the largest KL is called over-optimisation only when it is at least twice
    its standard error ``√(se_peak² + se_last²)``."""
    trained = {id(p): k for k, p in enumerate(points)}
    pts = _by_kl(points)
    d = _sqrt_kl(pts)
    gold = _recentred(pts, "gold")
    proxy = _recentred(pts, "proxy")
    if gold is None:
        if proxy is None:
            return "No gold or proxy reward was measured at these checkpoints."
        return (
            f"Without a gold score only the proxy can be read: it changes by {proxy[-1]:+.2f} "
            f"between √KL = {d[0]:.2f} and √KL = {d[-1]:.2f}."
        )
    i = int(np.argmax(gold))
    if i == len(pts) - 1:
        sentence = (
            f"Gold reward is highest at the largest KL measured (√KL ≈ {d[i]:.2f}, {gold[i]:+.2f} over the "
            f"starting policy), so no over-optimisation is visible in this range"
        )
        if proxy is not None:
            sentence += f"; the proxy changed by {proxy[-1]:+.2f} over the same range"
    elif i == 0:
        sentence = (
            f"Gold reward never rises above the starting policy's and is {-gold[-1]:.2f} lower at √KL ≈ {d[-1]:.2f}"
        )
        if proxy is not None:
            sentence += (
                f" while the proxy changed by {proxy[-1]:+.2f}: the reward model's gains do not carry "
                "over to the gold reward"
                if proxy[-1] > 0
                else f", and the proxy changed by {proxy[-1]:+.2f}"
            )
    elif all(trained[id(p)] < trained[id(pts[i])] for p in pts[i + 1 :]):
        name = lambda p: str(p.get("name", f"point {trained[id(p)] + 1}"))  # noqa: E731
        sentence = (
            f"Gold reward is highest at √KL ≈ {d[i]:.2f}, {name(pts[i])} ({gold[i]:+.2f} over the start); the "
            f"points of larger KL ({', '.join(name(p) for p in pts[i + 1 :])}) all came earlier in training, as "
            "the KL did not grow steadily, so they do not show what training longer would do"
        )
    else:
        drop = gold[i] - gold[-1]
        ses = [_num(pts[i].get("gold_se")), _num(pts[-1].get("gold_se"))]
        drop_se = math.hypot(*ses) if None not in ses else None
        sentence = (
            f"Gold reward peaks at √KL ≈ {d[i]:.2f} ({gold[i]:+.2f} over "
            f"the start) and is {drop:.2f}{'' if drop_se is None else f' ± {drop_se:.2f}'} lower at √KL ≈ {d[-1]:.2f}"
        )
        if drop_se is not None and drop < 2 * drop_se:
            # two batches of rollouts: a drop within 2 s.e. is what their sampling noise alone gives
            sentence += (
                ", less than two standard errors of the two points' rollouts: no over-optimisation is shown "
                "at this many rollouts per point"
            )
            if proxy is not None:
                sentence += f" (the proxy changed by {proxy[-1] - proxy[i]:+.2f} past the gold peak)"
        elif proxy is not None:
            if proxy[-1] >= proxy[i]:
                sentence += (
                    f" while the proxy keeps rising (by {proxy[-1] - proxy[i]:+.2f} past the gold peak): "
                    "the policy over-optimises the reward model beyond that point"
                )
            else:
                sentence += f", and the proxy also falls past that point (by {proxy[-1] - proxy[i]:+.2f})"
    fit = _try_fit_rl(d, gold)
    if fit is not None:
        peak = rl_peak(*fit)
        if math.isfinite(peak) and peak <= 2 * d.max():
            sentence += (
                f"; the fitted R_RL(d) = d(α − β log d) (α = {fit[0]:.2f}, β = {fit[1]:.2f}) peaks at √KL ≈ {peak:.2f}"
            )
        else:
            sentence += f"; the fitted R_RL (α = {fit[0]:.2f}, β = {fit[1]:.2f}) has no peak within the measured range"
    return sentence + "."


def describe_bon(curve: Sequence[Mapping[str, Any]]) -> str:
    rows = sorted(curve, key=lambda r: int(r["n"]))
    if len(rows) < 2:
        return "Best-of-N needs at least two values of N to show a trend."
    first, last = rows[0], rows[-1]
    sentence = (
        f"From N = {first['n']} to N = {last['n']} (KL bound {float(first['kl_bound']):.2f} to "
        f"{float(last['kl_bound']):.2f} nats) best-of-N changes the proxy reward by "
        f"{float(last['proxy']) - float(first['proxy']):+.2f}"
    )
    golds = [_num(r.get("gold")) for r in rows]
    if all(g is not None for g in golds):
        sentence += f" and the gold score by {golds[-1] - golds[0]:+.2f}"
        j = int(np.argmax(golds))
        if j < len(rows) - 1 and golds[-1] < golds[j]:
            sentence += (
                f"; gold is highest at N = {rows[j]['n']} and lower for larger N while the proxy "
                "keeps being maximised, over-optimisation by selection"
            )
        elif golds[-1] > golds[0]:
            sentence += "; selection against the reward model still improves the gold score at the largest N"
    return sentence + "."


def describe_length(points: Sequence[Mapping[str, Any]]) -> str:
    with_reward = [p for p in points if _num(p.get("reward")) is not None]
    with_gold = [p for p in points if _num(p.get("gold")) is not None]
    if not with_reward and not with_gold:
        return "No response was scored."
    parts = []
    r_rm = r_gold = None
    if len(with_reward) >= 2:
        r_rm = pearson([p["length"] for p in with_reward], [p["reward"] for p in with_reward])
        if not math.isnan(r_rm):
            parts.append(f"the reward-model score at r = {r_rm:+.2f}")
    if len(with_gold) >= 2:
        r_gold = pearson([p["length"] for p in with_gold], [p["gold"] for p in with_gold])
        if not math.isnan(r_gold):
            parts.append(f"the gold score at r = {r_gold:+.2f}")
    if not parts:
        return "Length or score is constant over these responses, so no correlation can be computed."
    sentence = f"Over {max(len(with_reward), len(with_gold))} responses, length correlates with " + " and with ".join(
        parts
    )
    if r_rm is not None and r_gold is not None and not (math.isnan(r_rm) or math.isnan(r_gold)):
        gap = r_rm - r_gold
        if gap > 0.2:
            sentence += "; the reward model pays for length more than the annotator does (verbosity bias)"
        elif gap < -0.2:
            sentence += "; the reward model favours short responses more than the annotator does"
        else:
            sentence += "; the reward model's length preference is close to the annotator's"
    return sentence + "."


def describe_rounds(rounds: Sequence[Mapping[str, Any]]) -> str:
    rows = sorted(rounds, key=lambda r: r["round"])
    if not rows:
        return "No rounds were run."
    parts = []
    for key, label in (("gold", "gold score"), ("proxy", "proxy reward")):
        vals = [_num(r.get(key)) for r in rows]
        if all(v is not None for v in vals):
            parts.append(f"the {label} went from {vals[0]:+.2f} to {vals[-1]:+.2f}")
    if not parts:
        return f"{len(rows)} rounds were run but no reward was recorded per round."
    return f"Across {len(rows)} rounds of iterated RLHF " + " and ".join(parts) + "."


def describe_study(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    clauses = []
    for label, points in runs.items():
        pts = _by_kl(points)
        gold = _recentred(pts, "gold")
        if gold is None or len(pts) < 2:
            continue
        d = _sqrt_kl(pts)
        i = int(np.argmax(gold))
        if i == 0 and gold[-1] < gold[0]:
            clauses.append(
                f"with {label} gold never rises above its start and is {-gold[-1]:.2f} lower at the largest KL "
                f"(√KL ≈ {d[-1]:.2f})"
            )
        elif i < len(pts) - 1 and gold[-1] < gold[i]:
            clauses.append(
                f"with {label} gold peaks at √KL ≈ {d[i]:.2f} and is {gold[i] - gold[-1]:.2f} lower "
                f"at the largest KL (√KL ≈ {d[-1]:.2f})"
            )
        else:
            clauses.append(f"with {label} gold is still at its highest at the largest KL (√KL ≈ {d[-1]:.2f})")
    if not clauses:
        return "No run has gold scores at two or more checkpoints."
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _new_figure(width: float = 6.4, height: float = 4.0, nrows: int = 1, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    """Render to a temporary PNG beside ``path`` and rename it into place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png")
    return path


def plot_ppo_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Three stacked panels: proxy reward, gold score and KL to the reference per iteration."""
    panels = [
        (k, t)
        for k, t in (
            ("reward/score", "reward-model score"),
            ("reward/gold", "gold score"),
            ("kl/ref", "KL to reference (nats)"),
        )
        if _series(rows, k)[1]
    ]
    if not panels:
        return None
    fig, axes = _new_figure(6.4, 2.2 * len(panels), nrows=len(panels))
    for ax, (key, title) in zip(axes[:, 0], panels):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="." if len(xs) < 60 else None, lw=1.2)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        if key == "kl/ref" and max(ys) >= 1.0:  # the band would squash a curve that stays near 0
            ax.axhspan(2, 6, color="tab:green", alpha=0.08, label="healthy band 2–6")
            ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("PPO iteration")
    return _save(fig, path)


def plot_overoptimisation(points: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Gold and proxy (recentred on the start) against √KL, with fitted R_RL curves; error bars where the
    points carry ``gold_se`` / ``proxy_se``."""
    pts = _by_kl(points)
    if len(pts) < 2:
        return None
    d = _sqrt_kl(pts)
    fig, axes = _new_figure()
    ax = axes[0, 0]
    grid = np.linspace(0, d.max() * 1.05, 200)
    drawn = False
    for key, color, label in (("gold", "tab:orange", "gold"), ("proxy", "tab:blue", "proxy (reward model)")):
        r = _recentred(pts, key)
        if r is None:
            continue
        drawn = True
        se = [_num(p.get(f"{key}_se")) for p in pts]
        if None in se:
            ax.plot(d, r, "o", color=color, label=f"{label}, checkpoints")
        else:
            ax.errorbar(d, r, yerr=se, fmt="o", color=color, capsize=2, label=f"{label}, checkpoints (± s.e.)")
        fit = _try_fit_rl(d, r)
        if fit is not None:
            ax.plot(
                grid,
                r_rl(grid, *fit),
                "--",
                color=color,
                lw=1,
                label=f"{label}, fit d(α − β log d): α={fit[0]:.2f}, β={fit[1]:.2f}",
            )
    if not drawn:
        return None
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("√KL to reference (√nats)")
    ax.set_ylabel("reward − reward at start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bon(curve: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = sorted(curve, key=lambda r: int(r["n"]))
    if len(rows) < 2:
        return None
    fig, axes = _new_figure()
    ax = axes[0, 0]
    kl = [float(r["kl_bound"]) for r in rows]
    proxy = [float(r["proxy"]) - float(rows[0]["proxy"]) for r in rows]
    ax.plot(kl, proxy, "o-", color="tab:blue", label="proxy (reward model)")
    if all(_num(r.get("gold")) is not None for r in rows):
        ax.plot(kl, [float(r["gold"]) - float(rows[0]["gold"]) for r in rows], "s-", color="tab:orange", label="gold")
    for x, y, r in zip(kl, proxy, rows):
        ax.annotate(f"N={r['n']}", (x, y), textcoords="offset points", xytext=(3, 5), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("KL bound log N − (N−1)/N (nats)")
    ax.set_ylabel(f"reward of the best-of-N response − at N = {rows[0]['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_length_reward(points: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Scatter of response length against the reward-model score (left) and gold (right), by policy."""
    keys = [k for k in ("reward", "gold") if any(_num(p.get(k)) is not None for p in points)]
    if not keys:
        return None
    fig, axes = _new_figure(4.2 * len(keys), 3.8, ncols=len(keys))
    policies = list(dict.fromkeys(p["policy"] for p in points))
    for ax, key in zip(axes[0], keys):
        for policy in policies:
            sel = [p for p in points if p["policy"] == policy and _num(p.get(key)) is not None]
            ax.scatter([p["length"] for p in sel], [p[key] for p in sel], s=10, alpha=0.6, label=policy)
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("reward-model score" if key == "reward" else "gold score")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = sorted(rounds, key=lambda r: r["round"])
    if not rows:
        return None
    fig, axes = _new_figure()
    ax = axes[0, 0]
    x = [r["round"] for r in rows]
    drawn = False
    for key, color, label in (("gold", "tab:orange", "gold"), ("proxy", "tab:blue", "proxy (that round's RM)")):
        ys = [_num(r.get(key)) for r in rows]
        if all(y is not None for y in ys):
            ax.plot(x, ys, "o-", color=color, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_study(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Gold (recentred per run) against √KL for several runs (e.g. KL coefficients) on one plot."""
    fig, axes = _new_figure(6.8, 4.4)
    ax = axes[0, 0]
    drawn = False
    colors = iter(
        [
            "tab:blue",
            "tab:orange",
            "tab:green",
            "tab:red",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:gray",
            "tab:olive",
            "tab:cyan",
        ]
    )
    for label, points in runs.items():
        pts = _by_kl(points)
        gold = _recentred(pts, "gold")
        if gold is None or len(pts) < 2:
            continue
        color = next(colors, None)
        d = _sqrt_kl(pts)
        ax.plot(d, gold, "o-", color=color, ms=4, lw=1, label=f"{label}")
        fit = _try_fit_rl(d, gold)
        if fit is not None:
            grid = np.linspace(0, d.max() * 1.05, 200)
            ax.plot(grid, r_rl(grid, *fit), ":", color=color, lw=1)
        drawn = True
    if not drawn:
        return None
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("√KL to reference (√nats)")
    ax.set_ylabel("gold − gold at start")
    ax.set_title("gold reward vs √KL (dotted: fitted d(α − β log d))", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# the document
# ---------------------------------------------------------------------------------------------
@dataclass
class Section:
    title: str
    sentence: str
    image: str | None = None  # path relative to the report
    missing: str | None = None  # shown instead of the image when there is nothing to draw


@dataclass
class ReportPaths:
    markdown: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    sentences: dict[str, str] = field(default_factory=dict)


def _gold_judge(eval_results: Any) -> str:
    """What gave the gold scores: ``settings["gold"]`` holds the judging reward model's folder, else
    True for the simulated annotator."""
    settings = getattr(eval_results, "settings", None)
    if settings is None and isinstance(eval_results, Mapping):
        settings = eval_results.get("settings")
    judge = (settings or {}).get("gold") if isinstance(settings, Mapping) else None
    return f"reward model {Path(judge).name}" if isinstance(judge, str) else "simulated annotator"


def _eval_metrics(eval_results: Any) -> dict[str, dict[str, Any]] | None:
    if eval_results is None:
        return None
    if hasattr(eval_results, "metrics"):
        return dict(eval_results.metrics)
    if isinstance(eval_results, Mapping) and "metrics" in eval_results and isinstance(eval_results["metrics"], Mapping):
        return dict(eval_results["metrics"])
    return dict(eval_results)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _prompt_str(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return "\n".join(f"{m['role']}: {m['content']}" if isinstance(m, Mapping) else str(m) for m in prompt)
    return str(prompt)


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;
padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-style:italic}pre{white-space:pre-wrap;margin:0;font-family:inherit}"""


def write_report(
    output_dir: str | Path,
    eval_results: Any = None,
    ppo_metrics: Sequence[Mapping[str, Any]] | None = None,
    overopt_points: Sequence[Mapping[str, Any]] | None = None,
    bon_curve: Sequence[Mapping[str, Any]] | None = None,
    length_reward_points: Sequence[Mapping[str, Any]] | None = None,
    rounds: Sequence[Mapping[str, Any]] | None = None,
    temperature: float | None = None,
    *,
    side_by_side: Sequence[Mapping[str, Any]] | None = None,
    study_runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    title: str = "tether report",
    notes: Sequence[str] = (),
) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``output_dir``.

    Inputs (every one optional; a missing one turns its section into a one-line note):

    * ``eval_results``: an ``EvalResults``, the ``eval.json`` document, or ``{policy: {metric: value}}``;
    * ``ppo_metrics``: rows of the PPO run's ``metrics.jsonl`` (``step``, ``reward/score``,
      ``reward/gold``, ``kl/ref``);
    * ``overopt_points``: ``{"name", "kl", "gold", "proxy"}`` per checkpoint, the starting policy
      (KL 0) included; values are recentred on the smallest-KL point;
    * ``bon_curve``: ``{"n", "kl_bound", "proxy", "gold"}`` per N (``evaluate.bon_curve``);
    * ``length_reward_points``: ``{"policy", "length", "reward", "gold"}`` per response;
    * ``rounds``: ``{"round", "gold", "proxy"}`` per round of iterated RLHF;
    * ``study_runs``: ``{label: [points]}`` for the gold-vs-√KL plot of several runs;
    * ``side_by_side``: ``{"prompt", "responses": {policy: {"response", "reward", "gold"}}}`` rows;
    * ``temperature``: the sampling temperature every KL figure is measured at.
    """
    out = Path(output_dir)
    plots_dir = out / PLOTS_DIR
    result = ReportPaths(markdown=out / REPORT_MD, html=out / REPORT_HTML)
    sections: list[Section] = []

    def add(key: str, title_: str, data, plot_fn, describe_fn, missing: str):
        if not data:
            sections.append(Section(title_, "", None, missing))
            return
        path = plot_fn(data, plots_dir / f"{key}.png")
        sentence = describe_fn(data)
        result.sentences[key] = sentence
        if path is None:
            sections.append(Section(title_, sentence, None, "Not enough points to draw this plot."))
        else:
            result.plots[key] = path
            sections.append(Section(title_, sentence, f"{PLOTS_DIR}/{path.name}"))

    metrics = _eval_metrics(eval_results)
    add(
        "ppo_curves",
        "PPO training: reward, gold score and KL per iteration",
        list(ppo_metrics or []),
        plot_ppo_curves,
        describe_ppo,
        "No PPO metrics were given (PPO was skipped or its metrics.jsonl is missing).",
    )
    add(
        "overoptimisation",
        "Over-optimisation: gold and proxy reward against √KL",
        list(overopt_points or []),
        plot_overoptimisation,
        describe_overoptimisation,
        "No checkpoint evaluations were given, so the over-optimisation curve cannot be drawn.",
    )
    add(
        "best_of_n",
        "Best-of-N: reward against the analytic KL bound",
        list(bon_curve or []),
        plot_bon,
        describe_bon,
        "No best-of-N curve was computed (it needs a reward model; `tether eval --bon_curve 1 2 4 8 16` "
        "or the pipeline draws it).",
    )
    add(
        "length_vs_reward",
        "Length against reward (verbosity bias)",
        list(length_reward_points or []),
        plot_length_reward,
        describe_length,
        "No scored responses were given.",
    )
    if rounds:
        add("rounds", "Iterated RLHF: gold and proxy reward per round", list(rounds), plot_rounds, describe_rounds, "")
    if study_runs:
        add(
            "study",
            "Over-optimisation study: gold against √KL for several KL coefficients",
            dict(study_runs),
            plot_study,
            describe_study,
            "",
        )

    t_note = (
        f"All samples are drawn at temperature T = {temperature:g}, and every KL figure (nats per response, "
        f"summed over response tokens) is measured at that T."
        if temperature is not None
        else "The sampling temperature was not recorded; KL figures depend on it."
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    # ---- markdown
    md = [f"# {title}", "", f"_Generated {generated}._ {t_note}", ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["## Policies compared", ""]
    table = metrics_table(metrics, _gold_judge(eval_results)) if metrics else None
    if table:
        md += [
            _md_table(*table),
            "",
            "KL for best-of-N is the analytic upper bound log N − (N−1)/N. Probe answers are greedy.",
            "",
        ]
    else:
        md += ["_No evaluation results were given._", ""]
    for s in sections:
        md += [f"## {s.title}", ""]
        if s.sentence:
            md += [s.sentence, ""]
        md += [f"![{s.title}]({s.image})" if s.image else f"_{s.missing}_", ""]
    if side_by_side:
        md += ["## Sample responses side by side", ""]
        for row in side_by_side:
            md += [f"**Prompt:** {_prompt_str(row['prompt'])}", ""]
            for policy, r in row["responses"].items():
                scores = ", ".join(f"{k} {float(r[k]):+.2f}" for k in ("reward", "gold") if _num(r.get(k)) is not None)
                text = _clip(r["response"]).replace("\n", " ")
                md += [f"- **{policy}**{f' ({scores})' if scores else ''}: {text}"]
            md += [""]

    # ---- html
    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Generated {generated}. {html.escape(t_note)}</p>",
    ]
    if notes:
        h.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    h.append("<h2>Policies compared</h2>")
    if table:
        h.append(_html_table(*table))
        h.append(
            "<p class='note'>KL for best-of-N is the analytic upper bound log N − (N−1)/N. "
            "Probe answers are greedy.</p>"
        )
    else:
        h.append("<p class='note'>No evaluation results were given.</p>")
    for s in sections:
        h.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.sentence:
            h.append(f"<p>{html.escape(s.sentence)}</p>")
        h.append(
            f"<img src='{html.escape(s.image)}' alt='{html.escape(s.title)}'>"
            if s.image
            else f"<p class='note'>{html.escape(s.missing or '')}</p>"
        )
    if side_by_side:
        h.append("<h2>Sample responses side by side</h2>")
        policies = list(dict.fromkeys(p for row in side_by_side for p in row["responses"]))
        h.append(
            "<table><thead><tr><th>prompt</th>"
            + "".join(f"<th>{html.escape(p)}</th>" for p in policies)
            + "</tr></thead><tbody>"
        )
        for row in side_by_side:
            cells = []
            for p in policies:
                r = row["responses"].get(p)
                if r is None:
                    cells.append("<td>–</td>")
                    continue
                scores = ", ".join(f"{k} {float(r[k]):+.2f}" for k in ("reward", "gold") if _num(r.get(k)) is not None)
                cells.append(
                    f"<td><pre>{html.escape(_clip(r['response']))}</pre>"
                    + (f"<p class='note'>{html.escape(scores)}</p>" if scores else "")
                    + "</td>"
                )
            h.append(f"<tr><td><pre>{html.escape(_prompt_str(row['prompt']))}</pre></td>{''.join(cells)}</tr>")
        h.append("</tbody></table>")
    h.append("</body></html>")

    write_text_atomic(result.markdown, "\n".join(md).rstrip() + "\n")
    write_text_atomic(result.html, "\n".join(h) + "\n")
    return result
