"""Statistics over the seeds of an optimizer comparison (scripts/compare.py): mean ± std, and
the one-sided t-tests of a group against the baseline (Welch's two-sample test and a one-sample
test against a fixed target), on a Student's t distribution of its own: pure Python, as scipy
is not a dependency.
"""

import math
import statistics


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); None for no values or one that is
    not finite (a run that failed, or has not finished)."""
    if not values or not all(math.isfinite(v) for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Student's t distribution from the regularized incomplete beta function:
# P(T <= t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2), for t < 0.

def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes, Sec. 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), with y = 1 - x passed exactly."""
    if x <= 0 or y <= 0:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1) / (a + b + 2):  # where the fraction converges fast; else use I_x(a, b) = 1 - I_y(b, a)
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = _beta_inc(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t)) / 2
    return tail if t < 0 else 1 - tail


def t_quantile(q: float, df: float) -> float:
    """The t with t_cdf(t, df) = q (0 < q < 1), by bisection."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def one_sided_t_test(fields: dict, diff: float, std_err: float | None, df: float, alpha: float) -> dict:
    """`fields` completed with the one-sided t-test of H1: the true difference < 0, given its
    estimate, standard error (None: a side has one seed) and degrees of freedom, and the
    difference's one-sided 1 - alpha upper confidence bound. One seed or no spread: no test."""
    out = {**fields, "diff_mean": diff, "diff_std_err": std_err, "diff_upper_bound": None, "t": None, "df": None,
           "p_one_sided": None, "significant": None, "no_test": None}
    if std_err is None:
        return {**out, "no_test": "n = 1: no test"}
    if std_err == 0:
        return {**out, "no_test": "no spread across seeds: no test"}
    p = t_cdf(diff / std_err, df)
    return {**out, "diff_upper_bound": diff + t_quantile(1 - alpha, df) * std_err, "t": diff / std_err, "df": df,
            "p_one_sided": p, "significant": p < alpha}


def welch_test(losses: list[float], baseline: list[float], alpha: float) -> dict:
    """Is the group's mean final loss lower than the baseline's? Welch's t-test: unequal
    variances, Welch-Satterthwaite degrees of freedom."""
    n, nb = len(losses), len(baseline)
    fields = {"test": "Welch's t-test, one-sided (H1: mean final val loss < the baseline's)", "n": n,
              "n_baseline": nb}
    diff = statistics.fmean(losses) - statistics.fmean(baseline)
    if min(n, nb) < 2:
        return one_sided_t_test(fields, diff, None, 0.0, alpha)
    v, vb = statistics.variance(losses) / n, statistics.variance(baseline) / nb
    df = (v + vb) ** 2 / (v * v / (n - 1) + vb * vb / (nb - 1)) if v + vb > 0 else 0.0
    return one_sided_t_test(fields, diff, math.sqrt(v + vb), df, alpha)


def target_test(losses: list[float], target: float, seeds_reaching: int, alpha: float) -> dict:
    """Does the group's mean final loss reach the target, a fixed number? One-sample t-test."""
    n = len(losses)
    fields = {"test": "one-sample t-test, one-sided (H1: mean final val loss < the target, taken as exact)",
              "target": target, "n": n, "seeds_reaching": seeds_reaching}
    diff = statistics.fmean(losses) - target
    if n < 2:
        return one_sided_t_test(fields, diff, None, 0.0, alpha)
    return one_sided_t_test(fields, diff, statistics.stdev(losses) / math.sqrt(n), n - 1, alpha)
