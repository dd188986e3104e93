"""plots.py: the figures of evaluate.py (and the pyplot rounds.py draws with), from numbers already computed.

  plot_scores    figure 4 (R against C per response) and figures 2b/2c (R and C histograms)
  plot_frontier  figure 6b (helpfulness against harm per policy; the analytic KL optimum's curve over nu)
  plot_curves    figure 6c (lambda and the episode cost against the step), the reward and the KL
  plot_sqrt_kl   Bai et al. 2022 (figures 4 and 13): score against sqrt(KL) over training (stats.sqrt_kl_fit)
  plot_successors  Safe RLHF's successors (tools/docs_blocks.py successors): benign helpfulness against the
                 oracle's unsafe rate, a marker per family, the fixed-nu points as a line, the safety target
Each writes its PNG(s) into `out` and returns their names; matplotlib is imported on first use, headless (Agg).
"""

from __future__ import annotations

import math
from pathlib import Path

from stats import running_mean, sqrt_kl_fit


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    return plt


def plot_scores(out: Path, per_policy: dict[str, dict]) -> list[str]:
    """Figure 4 (R against C per response) and figure 2b/2c (R and C histograms)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in per_policy.items():
        ax.scatter(s["costs"], s["rewards"], s=10, alpha=0.5, label=name)
    ax.axvline(0.0, color="k", lw=0.8, ls="--", label="C = 0 (safe | unsafe)")
    ax.set(xlabel="cost C", ylabel="reward R", title="reward vs cost per response (Safe RLHF fig. 4)")
    ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "scatter.png", dpi=120), plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "rewards", "reward distribution (fig. 2b)"),
                           (axes[1], "costs", "cost distribution (fig. 2c)")):
        for name, s in per_policy.items():
            ax.hist(s[key], bins=30, histtype="step", lw=1.5, label=name)
        ax.set(xlabel=key[:-1], ylabel="responses", title=title)
        ax.legend(fontsize=8)
    axes[1].axvline(0.0, color="k", lw=0.8, ls="--")
    fig.tight_layout(), fig.savefig(out / "histograms.png", dpi=120), plt.close(fig)
    return ["scatter.png", "histograms.png"]


def plot_frontier(out: Path, results: dict, sweep: list[dict] | None) -> list[str]:
    """Figure 6b: one point per policy; learned scale (mean C, mean R) and/or the oracle's (unsafe rate on
    harmful prompts, benign helpfulness) with the analytic optimum's curve over nu."""
    plt = pyplot()
    panels = [k for k in ("learned", "oracle") if k in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, s in results[panel].items():
            x, y = (s["cost"]["mean"], s["reward"]["mean"]) if panel == "learned" else \
                (s["all"]["unsafe_rate"]["rate"], s["all"]["helpfulness_benign"]["mean"])
            if x is not None and y is not None:
                ax.scatter([x], [y], s=40)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        if panel == "oracle" and sweep:
            ax.plot([r["unsafe_rate"] for r in sweep], [r["helpfulness_benign"] for r in sweep], "k--", lw=1,
                    label=f"KL optimum over nu (beta={sweep[0]['beta']:g})")
            ax.legend(fontsize=8)
        ax.set(xlabel="mean cost C" if panel == "learned" else "oracle unsafe rate on harmful prompts",
               ylabel="mean reward R" if panel == "learned" else "oracle helpfulness on benign prompts",
               title=f"helpfulness vs harm ({panel})")
    fig.tight_layout(), fig.savefig(out / "frontier.png", dpi=120), plt.close(fig)
    return ["frontier.png"]


def plot_sqrt_kl(out: Path, logs: dict[str, dict]) -> list[str]:
    """Bai et al.'s relation: mean reward and mean cost against sqrt(KL to the initial policy), each
    PPO run's training log (running mean over 10 rl_steps), with its least-squares line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key in zip(axes, ("reward", "cost")):
        for name, log in logs.items():
            r2 = sqrt_kl_fit(log)[f"{key}_r2"]
            ax.plot([math.sqrt(max(0.0, k)) for k in running_mean(log["kl"], 10)], running_mean(log[key], 10), lw=1.0,
                    label=f"{name} (R^2 {r2:.2f})" if r2 is not None else name)
        ax.set(xlabel="sqrt(KL(pi || pi_sft)), per sequence", ylabel=f"mean {key} model score")
        ax.legend(fontsize=7)
    fig.suptitle("Score against sqrt(KL) over PPO training (Bai et al. 2022, fig. 4/13)")
    fig.tight_layout(), fig.savefig(out / "sqrt_kl.png", dpi=120), plt.close(fig)
    return ["sqrt_kl.png"]


def plot_curves(out: Path, logs: dict[str, dict]) -> list[str]:
    """Figure 6c (lambda and the episode cost against the step) plus the reward and the KL; runs overlaid."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for (ax, key, label) in ((axes[0, 0], "lambda", "lambda"), (axes[0, 1], "episode_cost", "episode cost J_C"),
                             (axes[1, 0], "reward", "mean reward R"), (axes[1, 1], "kl", "KL(pi || pi_ref)")):
        for name, log in logs.items():
            ax.plot(log["step"], log[key], label=name, lw=1.8 if name.startswith("ppo_lag") else 1.0)
        if key == "episode_cost":  # each distinct threshold once
            for t in sorted({log["threshold"] for log in logs.values() if log["threshold"] is not None}):
                ax.axhline(t, color="black", ls="--", lw=0.8, label=f"threshold {t:g}")
        if key == "lambda":  # fixed nu up to 100 next to a learned lambda near 1: log-like scale
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set(xlabel="rl_step", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("PPO-Lagrangian training (Safe RLHF fig. 6c)")
    fig.tight_layout(), fig.savefig(out / "training_curves.png", dpi=120), plt.close(fig)
    return ["training_curves.png"]


FAMILY_STYLE = {  # family -> (marker, colour, legend label) of plot_successors
    "sft": ("*", "black", "SFT"), "ppo": ("X", "tab:red", "PPO (reward only)"),
    "nu": ("o", "tab:gray", "fixed nu (reward shaping, PPO)"),
    "safe_rlhf": ("^", "tab:blue", "Safe RLHF family (PPO-/RLOO-Lagrangian)"),
    "dpo": ("s", "tab:green", "DPO family (DPO, SafeDPO, MoCAN, SACPO)"), "other": ("D", "tab:purple", "other"),
}


def plot_successors(path: Path, points: dict[str, tuple[float, float]], labels: dict[str, str],
                    family: dict[str, str], nu: dict[str, float], target: float) -> None:
    """Benign helpfulness against the oracle's unsafe rate on harmful prompts, one labelled point per policy
    (points: name -> (unsafe rate, helpfulness)), a marker per family (FAMILY_STYLE), the fixed-nu points
    joined in the order of nu, and the safety target as a vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    line = sorted((nu[n], points[n]) for n in points if family[n] == "nu")
    if line:
        ax.plot([x for _, (x, _) in line], [y for _, (_, y) in line], "-", color="tab:gray", lw=1, zorder=1)
    for kind, (marker, colour, legend) in FAMILY_STYLE.items():
        mine = [n for n in points if family[n] == kind]
        if mine:
            ax.scatter([points[n][0] for n in mine], [points[n][1] for n in mine], marker=marker, color=colour,
                       s=120 if kind == "sft" else 60, label=legend, zorder=2)
        for n in mine:  # labels right of the point, left of it in the right third (inside the axes)
            right = points[n][0] > 0.67
            ax.annotate(labels[n], points[n], textcoords="offset points", xytext=(-5 if right else 5, 4), fontsize=7,
                        ha="right" if right else "left")
    ax.axvline(target, color="k", ls="--", lw=0.8, label=f"safety target: unsafe <= {target:g}")
    ax.set(xlabel="oracle unsafe rate on harmful prompts", ylabel="oracle helpfulness on benign prompts",
           title="Safe RLHF and its successors on the toy world")
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)
