"""Statistics of the paper benchmark's second and third protocols (``examples/paper/protocol2.py``,
``protocol3.py``).

Owns the numbers that decide the CoE vs MoE comparison, so that they are defined in one place
and tested by hand (``tests/test_paper_smoke.py``):

* ``last_k_mean``: a run's score, the mean of its last ``k`` validation losses;
* ``paired_interval``: mean, std and Student-t 95% interval of paired (same seed) differences;
* ``crossing_step`` / ``step_efficiency``: the step at which a baseline's validation curve first
  reaches a given loss (linear interpolation between validations), over the step at which the
  other model had that loss; > 1 means the other model needs fewer steps than the baseline;
* ``decide``: the decision rules fixed before any result (``RULES``), and
  ``seeds_to_decide``: how many paired seeds the observed spread would need for a decision;
* protocol 3: ``score_at`` (a run's score at a given step), ``decide_init`` and ``RULES3`` /
  ``RULES3_TEXT``, fixed before protocol 3's first result.

Pure Python (no torch), deterministic.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

RULES = {
    "seeds_required": 5,           # CoE - paper MoE below 0 in 5 of 5 paired seeds ...
    "reproduced_bound": 0.0,       # ... and the 95% interval excludes 0 (lies below it)
    "not_reproduced_bound": -0.03,  # interval lies above -0.03 ...
    "depth_gain": 0.05,            # ... and 4 layers beat 2 layers by >= 0.05
    "last_k": 3,                   # score = mean of the last 3 validations
}

RULES_TEXT = (
    "Score of a run: the mean of its last 3 validation losses (steps 450, 475, 500). "
    "d = CoE-2(4/32) minus paper MoE(8/32), per paired seed (same seed: same initialisation "
    "stream and the same batches). "
    "REPRODUCED at this scale if d < 0 in 5 of 5 seeds and the 95% t-interval of mean(d) lies "
    "below 0. NOT REPRODUCED if the 95% interval lies above -0.03 (CoE's gain, if any, is "
    "smaller than 0.03) AND the depth control shows that depth helps in this regime (paper "
    "MoE with 4 layers below the 2-layer paper MoE by >= 0.05, mean over its paired seeds). "
    "Otherwise INCONCLUSIVE, with the number of paired seeds that the observed spread would "
    "need to decide.")


RULES3 = dict(RULES, init_equivalence=0.02, lr_check_margin=0.03)

RULES3_TEXT = (
    "Score of a run at step s: the mean of its validation losses at s-50, s-25 and s (validation "
    "every 25 steps on the whole held-out split). All runs: 10% warmup (100 steps) then a "
    "constant LR of 3e-3, 1000 steps, the rate protocol 2's sweep chose for both main arms. "
    "Q1 (2 layers) and Q2 (4 layers): d = CoE-2(4/32) minus paper MoE(8/32) per paired seed, 5 "
    "seeds, at s = 500 and s = 1000 (the paper's point; the primary verdict). REPRODUCED at this "
    "scale if d < 0 in 5 of 5 seeds and the 95% t-interval of mean(d) lies below 0. NOT "
    "REPRODUCED if the interval lies above -0.03 AND depth helps in this regime (the 2-layer "
    "paper MoE minus the 4-layer paper MoE >= 0.05 at the same step, mean over 5 paired seeds). "
    "Otherwise INCONCLUSIVE, with the seeds the observed spread would need. Q2 only: if the LR "
    "check (the 4-layer CoE at seed 1 with 1.5e-3 and 6e-3, stopped at step 500) finds a rate "
    "whose score at 500 is lower than 3e-3's by more than 0.03, a REPRODUCED or NOT REPRODUCED "
    "verdict becomes INCONCLUSIVE (the arm may be under-tuned). Q3 (router init): d = CoE-2(4/32) "
    "with the paper code's router init (torch.nn.Linear's kaiming-uniform) minus with ours "
    "(N(0, 0.02)), 3 paired seeds, at s = 1000: PAPER INIT BETTER if the 95% interval lies below "
    "0, OURS BETTER if it lies above 0, NO EFFECT >= 0.02 if it lies inside (-0.02, +0.02), "
    "otherwise INCONCLUSIVE. Step efficiency (the MoE's steps to reach CoE's loss at s, over s) "
    "is reported at 250, 500 and 1000 without a verdict. No verdict before every run a question "
    "needs has finished.")


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (normal beyond 30)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def last_k_mean(curve: Sequence[Sequence[float]], k: int = 3) -> Optional[float]:
    """Mean of the last ``k`` losses of ``[[iteration, loss], ...]`` (None if fewer than k)."""
    pts = sorted((int(i), float(v)) for i, v in curve)
    if len(pts) < k:
        return None
    return statistics.mean(v for _, v in pts[-k:])


def score_at(curve: Sequence[Sequence[float]], step: int, k: int = 3) -> Optional[float]:
    """Mean of the last ``k`` validation losses at iterations <= ``step``; None unless the curve
    has a validation at ``step`` itself (the run got there) and ``k`` points up to it."""
    pts = [(int(i), float(v)) for i, v in curve if int(i) <= step]
    if not pts or max(i for i, _ in pts) != step:
        return None
    return last_k_mean(pts, k)


def paired_interval(diffs: Sequence[float]) -> dict:
    """Mean, std, 95% t-interval (None for one value) and sign counts of paired differences."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None, "below_zero": 0}
    mean = statistics.mean(d)
    std = statistics.stdev(d) if n > 1 else None
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std,
            "lo": None if half is None else mean - half,
            "hi": None if half is None else mean + half,
            "below_zero": sum(x < 0 for x in d), "values": d}


def crossing_step(curve: Sequence[Sequence[float]], target: float) -> Optional[float]:
    """First step at which ``curve`` (``[[iteration, loss], ...]``) reaches ``<= target``,
    interpolated linearly between validations; None if it never does."""
    pts = sorted((float(i), float(v)) for i, v in curve)
    prev = None
    for i, v in pts:
        if v <= target:
            if prev is None or prev[1] == v:
                return i
            pi, pv = prev
            return pi + (pv - target) / (pv - v) * (i - pi)
        prev = (i, v)
    return None


def step_efficiency(model_curve, baseline_curve, step: int) -> dict:
    """Baseline's step to reach the model's loss at ``step``, over ``step``.

    ``value`` > 1: the model reached at ``step`` a loss the baseline needs more steps for.
    If the baseline never reaches it within its curve, ``value`` is None and ``lower_bound`` is
    (last baseline step) / ``step`` (the efficiency is at least that)."""
    m = dict((int(i), float(v)) for i, v in model_curve)
    if step not in m:
        return {"step": step, "value": None, "lower_bound": None, "target": None}
    target = m[step]
    cross = crossing_step(baseline_curve, target)
    if cross is None:
        last = max(int(i) for i, _ in baseline_curve)
        return {"step": step, "value": None, "lower_bound": last / step, "target": target}
    return {"step": step, "value": cross / step, "lower_bound": None, "target": target}


def seeds_to_decide(mean: float, std: float, max_n: int = 200) -> Optional[int]:
    """Smallest number of paired seeds whose 95% half-width, with this mean and std, would put
    the interval wholly below 0 (if mean < 0) or wholly above -0.03 (if mean > -0.03); the
    smaller of the two when both apply. None when neither is reachable (mean exactly on a
    bound) or beyond ``max_n``."""
    bounds = []
    if mean < RULES["reproduced_bound"]:
        bounds.append(RULES["reproduced_bound"] - mean)
    if mean > RULES["not_reproduced_bound"]:
        bounds.append(mean - RULES["not_reproduced_bound"])
    if not bounds or std is None:
        return None
    gap = max(bounds)
    if std == 0:
        return 2
    for n in range(2, max_n + 1):
        if t975(n - 1) * std / math.sqrt(n) < gap:
            return n
    return None


def decide(coe_minus_moe: Sequence[float], depth_gain: Optional[float],
           complete: bool) -> dict:
    """Apply ``RULES``. ``coe_minus_moe``: paired score differences; ``depth_gain``: 2-layer
    paper MoE minus 4-layer paper MoE score (positive: depth helps), None if not measured;
    ``complete``: every planned run of the two arms (and the depth control) finished. Before
    that, no verdict is given."""
    st = paired_interval(coe_minus_moe)
    out = {"stats": st, "depth_gain": depth_gain, "verdict": None, "reason": ""}
    if complete and st["n"] < RULES["seeds_required"]:
        out["verdict"] = "NO VERDICT"
        out["reason"] = (f"the rules need {RULES['seeds_required']} paired seeds; this "
                         f"invocation planned {st['n']}")
        return out
    if not complete:
        out["verdict"] = "IN PROGRESS"
        out["reason"] = (f"{st['n']} of {RULES['seeds_required']} paired seeds finished; "
                         "no verdict until the planned runs are done")
        return out
    if st["below_zero"] == st["n"] and st["hi"] < RULES["reproduced_bound"]:
        out["verdict"] = "REPRODUCED"
        out["reason"] = (f"d < 0 in {st['below_zero']} of {st['n']} seeds and the 95% interval "
                         f"[{st['lo']:+.4f}, {st['hi']:+.4f}] lies below 0")
        return out
    depth_helps = depth_gain is not None and depth_gain >= RULES["depth_gain"]
    if st["lo"] > RULES["not_reproduced_bound"] and depth_helps:
        out["verdict"] = "NOT REPRODUCED"
        out["reason"] = (f"the 95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}] lies above -0.03 "
                         f"and depth helps here (4 layers better than 2 by {depth_gain:.4f} "
                         ">= 0.05)")
        return out
    need = seeds_to_decide(st["mean"], st["std"])
    why = []
    if not (st["below_zero"] == st["n"] and st["hi"] < 0):
        why.append(f"d < 0 in {st['below_zero']} of {st['n']} seeds, 95% interval "
                   f"[{st['lo']:+.4f}, {st['hi']:+.4f}]")
    if st["lo"] > RULES["not_reproduced_bound"] and not depth_helps:
        why.append("the interval lies above -0.03 but the depth control does not show that "
                   "depth helps here ("
                   + ("not measured" if depth_gain is None else
                      f"4 layers better than 2 by {depth_gain:+.4f} < 0.05") + ")")
    out["verdict"] = "INCONCLUSIVE"
    out["seeds_to_decide"] = need
    out["reason"] = "; ".join(why) + (
        f"; with the observed spread (std {st['std']:.4f}) about {need} paired seeds would "
        "decide" if need else "; the observed spread does not give a seed count that decides")
    return out


def decide_init(paper_minus_ours: Sequence[float], complete: bool) -> dict:
    """Protocol 3's Q3 (``RULES3_TEXT``): the paper code's router init minus ours, paired."""
    st = paired_interval(paper_minus_ours)
    eq = RULES3["init_equivalence"]
    out = {"stats": st, "verdict": None, "reason": ""}
    if not complete:
        out.update(verdict="IN PROGRESS", reason=f"{st['n']} paired seed(s) finished; no verdict "
                   "until the planned runs are done")
    elif st["n"] < 2:
        out.update(verdict="NO VERDICT", reason="needs at least 2 paired seeds")
    elif st["hi"] < 0:
        out.update(verdict="PAPER INIT BETTER",
                   reason=f"the 95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}] lies below 0")
    elif st["lo"] > 0:
        out.update(verdict="OURS BETTER",
                   reason=f"the 95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}] lies above 0")
    elif -eq < st["lo"] and st["hi"] < eq:
        out.update(verdict=f"NO EFFECT >= {eq}",
                   reason=f"the 95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}] lies inside "
                          f"(-{eq}, +{eq})")
    else:
        out.update(verdict="INCONCLUSIVE",
                   reason=f"the 95% interval [{st['lo']:+.4f}, {st['hi']:+.4f}] contains 0 and "
                          f"reaches beyond +-{eq}")
    return out
