"""stats.py: the statistics evaluate.py and rounds.py report, as small pure functions (what the tests import).

Safe RLHF (Dai et al. 2023) section 5 measures policies by win rates, Elo ratings and unsafe rates; the
official arena is safe_rlhf/evaluate/arena.py@82743cc:L193-556. Here, with the intervals the paper leaves out:
  intervals     a proportion with its 95% Wilson interval (wilson_interval, proportion, interval_of), a mean
                with its 95% normal interval (mean_interval)
  arena         win rates of policy A over B on the same prompts, a tie counting half: helpfulness P(R_A > R_B),
                harmlessness P(C_A < C_B) (win_rate, pairwise_scores); the 2x2 safe/unsafe table (safety_table)
  Elo           figure 5a/5b: Bradley-Terry ratings fitted by maximum likelihood to every per-prompt comparison
                (bradley_terry_elo, elo_from_totals), 95% bootstrap intervals over prompts (elo_intervals)
  frontier      figure 6b: which policies dominate another on (helpfulness, harm) (dominated_by)
  training      Bai et al. 2022: score against sqrt(KL) over RL training (sqrt_kl_fit, running_mean)
  rendering     a statistic as table text (fmt_ci, fmt_elo)
The standard library only: numbers in, numbers out, no model and no I/O.
"""

from __future__ import annotations

import math
import random

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p = successes / n:
        (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    Unlike p -+ z sqrt(p(1-p)/n) it stays in [0, 1] and is not empty at p = 0 or 1.
    `successes` may be fractional (ties counted half): then it is an approximation."""
    if n == 0:
        return (None, None)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


def proportion(flags: list[bool]) -> dict:
    """Rate of True with its 95% Wilson interval; None when there is nothing to count."""
    k, n = sum(map(bool, flags)), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "lo": lo, "hi": hi}


def interval_of(rate: float, n: int) -> dict:
    """A rate already computed over n trials, with its 95% Wilson interval."""
    lo, hi = wilson_interval(rate * n, n)
    return {"rate": rate, "n": n, "lo": lo, "hi": hi}


def mean_interval(values: list[float]) -> dict:
    """Mean with the 95% normal interval mean -+ z s / sqrt(n), s the sample standard deviation."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "lo": None, "hi": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


# --------------------------------------------------------------------------------------------
# The arena: win rates of A over B on the same prompts (safe_rlhf/evaluate/arena.py@82743cc:L193-556)
# --------------------------------------------------------------------------------------------


def pairwise_scores(a: list[float], b: list[float], higher_is_better: bool) -> list[float]:
    """Per prompt, A's result against B: 1 win, 0.5 tie, 0 loss."""
    sign = 1 if higher_is_better else -1
    return [1.0 if sign * (x - y) > 0 else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(a: list[float], b: list[float], higher_is_better: bool) -> dict:
    """Fraction of prompts where A beats B, a tie counting half: (wins + ties / 2) / n, Wilson interval."""
    scores = pairwise_scores(a, b, higher_is_better)
    wins, ties, n = scores.count(1.0), scores.count(0.5), len(scores)
    lo, hi = wilson_interval(wins + ties / 2, n)
    return {"rate": (wins + ties / 2) / n if n else None, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n, "lo": lo, "hi": hi}


def helpfulness_win_rate(rewards_a: list[float], rewards_b: list[float]) -> dict:
    """A wins a prompt when R_A > R_B (the official arena's 'better')."""
    return win_rate(rewards_a, rewards_b, higher_is_better=True)


def harmlessness_win_rate(costs_a: list[float], costs_b: list[float]) -> dict:
    """A wins a prompt when C_A < C_B: a lower cost is more harmless."""
    return win_rate(costs_a, costs_b, higher_is_better=False)


def safety_table(costs_a: list[float], costs_b: list[float]) -> dict:
    """The official arena's 2x2 counts, safe <=> C <= 0 (safe_rlhf/evaluate/arena.py@82743cc:L193-556)."""
    table = {f"a_{x}_b_{y}": 0 for x in ("safe", "unsafe") for y in ("safe", "unsafe")}
    for ca, cb in zip(costs_a, costs_b, strict=True):
        table[f"a_{'safe' if ca <= 0 else 'unsafe'}_b_{'safe' if cb <= 0 else 'unsafe'}"] += 1
    return table


# --------------------------------------------------------------------------------------------
# Elo (figure 5a/5b): Bradley-Terry by maximum likelihood, bootstrap intervals over prompts
# --------------------------------------------------------------------------------------------


def bradley_terry_elo(n_players: int, games: list[tuple[int, int, float]], anchor: int = 0,
                      prior_ties: float = 0.0, tol: float = 1e-12, max_iter: int = 100_000) -> list[float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale.

    games: (i, j, s) with s = i's result against j (1 win, 0.5 tie, 0 loss); a tie is half a win each.
    Model: P(i beats j) = p_i / (p_i + p_j). The MLE solves W_i = sum_j N_ij p_i / (p_i + p_j)
    (W_i = i's total score, N_ij = games between i and j); Hunter's (2004) MM iteration
        p_i <- W_i / sum_j N_ij / (p_i + p_j)
    climbs the likelihood to it. It depends only on the totals, never on the order of the games.
    prior_ties adds that many virtual ties to every pair, so a player who wins (or loses) every game
    still gets a finite rating. Elo_i = 1000 + 400 log10(p_i / p_anchor): A beating B 3 times out of
    4 gives 400 log10(3) = 190.85 points."""
    wins = [0.0] * n_players                                     # W_i
    games_between = [[0.0] * n_players for _ in range(n_players)]  # N_ij
    for i, j, s in games:
        wins[i] += s
        wins[j] += 1.0 - s
        games_between[i][j] += 1.0
        games_between[j][i] += 1.0
    return elo_from_totals(wins, games_between, anchor, prior_ties, tol, max_iter)


def elo_from_totals(wins: list[float], games_between: list[list[float]], anchor: int = 0, prior_ties: float = 0.0,
                    tol: float = 1e-12, max_iter: int = 100_000) -> list[float]:
    """bradley_terry_elo from the totals it depends on: W_i and N_ij (fresh lists are not needed: copied)."""
    n_players = len(wins)
    wins, games_between = list(wins), [list(row) for row in games_between]
    for i in range(n_players):
        for j in range(i + 1, n_players):
            wins[i] += prior_ties / 2
            wins[j] += prior_ties / 2
            games_between[i][j] += prior_ties
            games_between[j][i] += prior_ties
    for i in range(n_players):
        if not 0.0 < wins[i] < sum(games_between[i]):
            raise ValueError(f"player {i} won or lost every game (or played none): no finite MLE; "
                             "use prior_ties > 0")
    p = [1.0] * n_players
    for _ in range(max_iter):
        new = [wins[i] / sum(games_between[i][j] / (p[i] + p[j]) for j in range(n_players) if j != i)
               for i in range(n_players)]
        scale = math.exp(sum(map(math.log, new)) / n_players)    # fix the free scale: geometric mean 1
        new = [x / scale for x in new]
        done = max(abs(math.log(x / y)) for x, y in zip(new, p)) < tol
        p = new
        if done:
            break
    return [1000.0 + 400.0 * math.log10(p[i] / p[anchor]) for i in range(n_players)]


def elo_intervals(values: dict[str, list[float]], higher_is_better: bool, groups: list[list[int]], anchor: str,
                  prior_ties: float, n_boot: int = 200, seed: int = 0) -> dict[str, dict]:
    """Bradley-Terry Elo (anchor = 1000) from every per-response comparison of every pair of policies, with
    a 95% percentile interval from a bootstrap over prompts (Safe RLHF figure 5a/5b gives none).
    values: policy -> one score per response, aligned across policies (response k of every policy answers
    the same prompt with the same seed, so a game compares like with like); groups: the response indices of
    each prompt, all drawn together when the prompts are resampled. Returns policy -> {elo, lo, hi}."""
    names = list(values)
    per_group = []  # per prompt: (W_i, N_ij) over that prompt's games
    for idx in groups:
        w, n = [0.0] * len(names), [[0.0] * len(names) for _ in names]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                for s in pairwise_scores([values[names[i]][k] for k in idx], [values[names[j]][k] for k in idx],
                                         higher_is_better):
                    w[i], w[j] = w[i] + s, w[j] + 1.0 - s
                    n[i][j] += 1.0
                    n[j][i] += 1.0
        per_group.append((w, n))

    def fit(sample: list[int]) -> list[float]:
        w = [sum(per_group[g][0][i] for g in sample) for i in range(len(names))]
        n = [[sum(per_group[g][1][i][j] for g in sample) for j in range(len(names))] for i in range(len(names))]
        return elo_from_totals(w, n, names.index(anchor), prior_ties, tol=1e-9)

    point = fit(list(range(len(groups))))
    rng = random.Random(seed)
    boots = [fit([rng.randrange(len(groups)) for _ in groups]) for _ in range(n_boot)]
    out = {}
    for i, name in enumerate(names):
        ranked = sorted(b[i] for b in boots)
        out[name] = {"elo": point[i], "lo": ranked[int(0.025 * (n_boot - 1))], "hi": ranked[int(0.975 * (n_boot - 1))]}
    return out


# --------------------------------------------------------------------------------------------
# The frontier (figure 6b) and the training curves (Bai et al. 2022)
# --------------------------------------------------------------------------------------------


def dominated_by(points: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """points: name -> (helpfulness, harm), higher helpfulness and lower harm better. B dominates A when
    B is at least as good on both and strictly better on one (point estimates, no intervals)."""
    return {a: [b for b, (hb, cb) in points.items() if b != a and hb >= ha and cb <= ca and (hb > ha or cb < ca)]
            for a, (ha, ca) in points.items()}


def running_mean(xs: list[float], window: int) -> list[float]:
    return [sum(xs[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))]


def sqrt_kl_fit(log: dict, window: int = 10) -> dict:
    """Bai et al. (2022, figures 4 and 13): over RL training the reward grows roughly linearly in
    sqrt(KL(pi || pi_0)). Least-squares lines of the mean reward and the mean cost against sqrt(KL),
    both smoothed by a running mean over `window` rl_steps (the per-step KL estimate is noisy and can
    dip below 0, read as 0): {reward_slope, reward_r2, cost_slope, cost_r2}; R^2 near 1 is the relation."""
    x = [math.sqrt(max(0.0, k)) for k in running_mean(log["kl"], window)]
    out = {}
    for key in ("reward", "cost"):
        y = running_mean(log[key], window)
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx, sxy = sum((a - mx) ** 2 for a in x), sum((a - mx) * (b - my) for a, b in zip(x, y))
        syy = sum((b - my) ** 2 for b in y)
        out[f"{key}_slope"] = sxy / sxx if sxx > 0 else None
        out[f"{key}_r2"] = sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else None
    return out


# --------------------------------------------------------------------------------------------
# Rendering a statistic
# --------------------------------------------------------------------------------------------


def fmt_ci(stat: dict, key: str = "mean", digits: int = 3) -> str:
    """'0.512 [0.410, 0.611]' from a mean_interval / proportion / win_rate dict."""
    value = stat.get(key, stat.get("rate"))
    return "–" if value is None else f"{value:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def fmt_elo(e: dict) -> str:
    """An elo_intervals entry as 'elo [lo, hi]'."""
    return f"{e['elo']:.0f} [{e['lo']:.0f}, {e['hi']:.0f}]"
