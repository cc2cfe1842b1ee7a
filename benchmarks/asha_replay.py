"""Replay Ray Tune's ASHA offline from the curves of a grid run to completion, over many arrival orders.

    python -m benchmarks.asha_replay --from benchmarks/results/tune_efficiency.json [--concurrency 4]
        [--grace-period 2] [--reduction-factor 4] [--orders 20000] [--subset 1e-4,2e-4,...]

Running every config of a grid to completion (the full side of benchmarks.tune_efficiency) records
each config's whole validation curve, and ASHA's decisions are a function of those curves and of the
order in which reports reach the scheduler. So one full run answers, for any arrival order of the
configs: how many trial-steps ASHA would have used, and whether it would have kept the best config.
One real ASHA run is one draw of that order; the replay gives the mean and spread over orders.

The rule is Ray 2.60's AsyncHyperBandScheduler with one bracket (ray/tune/schedulers/async_hyperband.py):
rungs at grace * rf^k for k < int(log(max_t / grace) / log(rf) + 1); a report at or past a rung the
trial has not recorded yet is compared with the results recorded there before it: the trial stops when
its reward (-metric for mode min) is below np.nanpercentile(recorded, (1 - 1/rf) * 100), and its reward
is recorded either way. The first trial at a rung always continues, and so does any trial that leads it.

Timing model for several trials at once: trials start in arrival order as slots free up; a trial's
report at step s comes `startup + s * step_time` seconds after its start, a stopped trial frees its slot
at once, and reports due at the same moment are taken in start order. With every trial alike, reports
reach each rung in arrival order whatever the concurrency, so ASHA decides as with one trial at a time;
what changes the order at a rung is trials running at different speeds. So each trial's (startup,
step_time) is drawn from those measured in the real full run (`timings`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np


def milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The rung milestones of Ray's single ASHA bracket, largest first (as Ray keeps them)."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in reversed(range(count))]


def cutoff(recorded: list[float], reduction_factor: float) -> float | None:
    """Ray's cutoff: the (1 - 1/rf) percentile of the rewards recorded at a rung; None when none are."""
    if not recorded:
        return None
    return float(np.nanpercentile(recorded, (1 - 1 / reduction_factor) * 100))


def decide(rungs: list[tuple[float, dict]], trial, step: int, reward: float, reduction_factor: float,
           max_t: int) -> bool:
    """True when ASHA stops `trial` on this report (reward: larger is better); records it at its rung.

    Mirrors AsyncHyperBandScheduler.on_trial_result with stop_last_trials (Ray's default): a report at
    max_t stops the trial (it has finished); otherwise the highest rung reached and not yet recorded decides.
    """
    if step >= max_t:
        return True
    for milestone, recorded in rungs:
        if step < milestone or trial in recorded:
            continue
        cut = cutoff(list(recorded.values()), reduction_factor)
        recorded[trial] = reward
        return cut is not None and reward < cut
    return False


def new_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[tuple[float, dict]]:
    return [(m, {}) for m in milestones(grace_period, reduction_factor, max_t)]


def replay_reports(curves: dict, reports: list[tuple], grace_period: int, reduction_factor: float, max_t: int,
                   mode: str = "min") -> dict:
    """Each trial's stop step when ASHA takes `reports` ([trial, step]) in this order (a recorded run's order).

    `curves[trial][step]` is the metric reported at that step. Reports of a trial after its stop are ignored,
    as Tune ignores them; a trial never stopped keeps its last step.
    """
    sign = -1.0 if mode == "min" else 1.0
    rungs = new_rungs(grace_period, reduction_factor, max_t)
    stopped: dict = {}
    last: dict = {}
    for trial, step in reports:
        if trial in stopped or step == 0:  # step 0: a start event
            continue
        last[trial] = step
        if decide(rungs, trial, step, sign * curves[trial][step], reduction_factor, max_t):
            stopped[trial] = step
    return {trial: stopped.get(trial, last[trial]) for trial in last}


def simulate(curves: dict, order: list, grace_period: int, reduction_factor: float, max_t: int,
             concurrency: int = 1, timings: list[tuple[float, float]] | None = None, mode: str = "min") -> dict:
    """Steps each trial of `order` uses under ASHA, with `concurrency` trials at once; `timings[i]` is the
    (startup, step_time) of the i-th trial to start (default: all (0, 1)). Timing model above."""
    sign = -1.0 if mode == "min" else 1.0
    rungs = new_rungs(grace_period, reduction_factor, max_t)
    steps_of = {trial: sorted(curves[trial]) for trial in order}
    events: list = []  # (time, start rank, report index)
    used: dict = {}
    pending = list(reversed(order))

    def start(now: float) -> None:
        rank = len(order) - len(pending)
        trial = pending.pop()
        startup, step_time[trial] = timings[rank] if timings else (0.0, 1.0)
        heapq.heappush(events, (now + startup + steps_of[trial][0] * step_time[trial], rank, 0, trial))

    step_time: dict = {}
    for _ in range(min(concurrency, len(order))):
        start(0.0)
    while events:
        now, rank, index, trial = heapq.heappop(events)
        steps = steps_of[trial]
        step = steps[index]
        if decide(rungs, trial, step, sign * curves[trial][step], reduction_factor, max_t) or index + 1 == len(steps):
            used[trial] = step
            if pending:
                start(now)
        else:
            heapq.heappush(events, (now + (steps[index + 1] - step) * step_time[trial], rank, index + 1, trial))
    return used


def outcome(curves: dict, used: dict, max_t: int, mode: str = "min") -> tuple[float, bool, float]:
    """(compute_frac, same_best, gap) of one replay: trial-steps against every config run to max_t; whether
    the best by final metric (a stopped trial competes with what it reached, as tune.search ranks) is the
    best of the full run; and how much worse the config ASHA picked ends when run to max_t (0 if the same)."""
    pick = min if mode == "min" else max
    full_best = pick(curves, key=lambda t: curves[t][max_t])
    asha_best = pick(used, key=lambda t: curves[t][used[t]])
    gap = abs(curves[asha_best][max_t] - curves[full_best][max_t])
    return sum(used.values()) / (len(used) * max_t), asha_best == full_best, gap


def over_orders(curves: dict, grace_period: int, reduction_factor: float, max_t: int, concurrency: int = 1,
                timings: list[tuple[float, float]] | None = None, orders: int = 20000, seed: int = 0,
                mode: str = "min") -> dict:
    """compute_frac (mean, p10, p50, p90) and the share of orders finding the same best, over every arrival
    order when there are at most `orders` of them, else over `orders` seeded random ones. With `timings`
    (measured (startup, step_time) pairs) and concurrency > 1, each order's trials draw theirs from them."""
    trials = list(curves)
    rng = random.Random(seed)
    if math.factorial(len(trials)) <= orders:
        from itertools import permutations

        sample = permutations(trials)
    else:
        sample = (rng.sample(trials, len(trials)) for _ in range(orders))
    fracs, same, gaps = [], 0, []
    for order in sample:
        drawn = [rng.choice(timings) for _ in trials] if timings and concurrency > 1 else None
        frac, same_best, gap = outcome(curves, simulate(curves, list(order), grace_period, reduction_factor, max_t,
                                                   concurrency, drawn, mode), max_t, mode)
        fracs.append(frac)
        same += same_best
        gaps.append(gap)
    q = np.percentile(fracs, [10, 50, 90])
    return {"configs": len(trials), "orders": len(fracs), "exhaustive": math.factorial(len(trials)) <= orders,
            "grace_period": grace_period, "reduction_factor": reduction_factor, "concurrency": concurrency,
            "timing": "drawn from the measured trials" if timings and concurrency > 1 else "all alike",
            "mean_compute_frac": round(float(np.mean(fracs)), 4),
            "p10": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4),
            "same_best_share": round(same / len(fracs), 4),
            # When ASHA keeps another config: how much worse that config's final metric is than the best's.
            "mean_gap_when_missed": round(float(np.mean([g for g in gaps if g > 0])), 5) if any(gaps) else 0.0,
            "max_gap": round(float(max(gaps)), 5)}


def curves_of(side: dict) -> dict:
    """{config: {step: metric}} from a tune_efficiency side (its trials' histories)."""
    return {t["config"]: {int(s): float(v) for s, v in t["history"]} for t in side["trials"]}


def timings_of(side: dict) -> list[tuple[float, float]]:
    """(seconds from a trial's start to its step 0, seconds per step) of each trial, from its report times."""
    timings = []
    for trial in side["trials"]:
        times = trial.get("report_times") or []
        if len(times) >= 2:
            (s0, t0), (s1, t1) = times[0], times[-1]
            per_step = (t1 - t0) / (s1 - s0)
            if per_step > 0:
                timings.append((max(t0 - s0 * per_step, 0.0), per_step))
    return timings


def report_for_benchmark(full: dict, asha: dict, grace_period: int, reduction_factor: float, max_t: int,
                         orders: int = 20000, subsets: dict | None = None) -> dict:
    """The replay's figures beside a real run: does the replay reproduce the real ASHA run, and what ASHA
    saves in expectation over arrival orders at the run's concurrency (and one trial at a time)."""
    curves = curves_of(full)
    asha_curves = curves_of(asha)
    by_id = {t["trial"]: t["config"] for t in asha["trials"]}
    # The real run's reports in the order Tune processed them, replayed with the values they carried.
    reports = [(by_id[trial], step) for trial, step in asha["order"] if trial in by_id]
    replayed = replay_reports(asha_curves, reports, grace_period, reduction_factor, max_t)
    real_steps = {t["config"]: t["steps"] for t in asha["trials"]}
    concurrency = asha.get("concurrency") or 1
    timings = timings_of(full) + timings_of(asha)
    expected = over_orders(curves, grace_period, reduction_factor, max_t, concurrency, timings, orders)
    result = {
        # Same seed and data: a config's curve is the same on both sides, so the full side's curves stand in
        # for what ASHA's trials would report in any order.
        "curves_identical": all(asha_curves[c][s] == curves[c][s] for c in asha_curves for s in asha_curves[c]),
        "matches_real_run": replayed == real_steps,
        "replayed_steps": {str(k): v for k, v in replayed.items()},
        "expected_compute_frac": expected["mean_compute_frac"], "same_best_share": expected["same_best_share"],
        "compute_frac_p10": expected["p10"], "compute_frac_p90": expected["p90"],
        "at_run_concurrency": expected,
        "one_at_a_time": over_orders(curves, grace_period, reduction_factor, max_t, 1, None, orders),
    }
    for name, values in (subsets or {}).items():
        sub = {v: curves[v] for v in values}
        result[name] = over_orders(sub, grace_period, reduction_factor, max_t, concurrency, timings, orders)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="a tune_efficiency JSON (its full side)")
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=None, help="default: the real run's (full side's), else 1")
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--subset", default=None, metavar="REGEX",
                        help="replay only the configs whose name matches, e.g. 'warmup_steps=(2|8)$'")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.source).read_text())
    full = data["full"]
    curves = curves_of(full)
    if args.subset:
        curves = {name: c for name, c in curves.items() if re.search(args.subset, name)}
    max_t = max(max(c) for c in curves.values())
    concurrency = args.concurrency or full.get("concurrency") or 1
    timings = timings_of(full) + timings_of(data.get("asha") or {"trials": []})
    stats = over_orders(curves, args.grace_period, args.reduction_factor, max_t, concurrency, timings, args.orders)
    print(json.dumps(stats, indent=2))
    print(f"expected_compute_frac={stats['mean_compute_frac']:.3f} p10={stats['p10']:.3f} p90={stats['p90']:.3f} "
          f"same_best_share={stats['same_best_share']:.3f} configs={stats['configs']} orders={stats['orders']} "
          f"concurrency={concurrency} grace={args.grace_period} rf={args.reduction_factor:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
