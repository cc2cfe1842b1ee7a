"""benchmarks.asha_replay: ASHA's decisions replayed offline from full curves.

Hand-built curves whose outcome is worked out by hand below, and the replay's rule checked against Ray's
own AsyncHyperBandScheduler fed the same reports (no Ray cluster: the scheduler is plain Python).
"""

import random
from types import SimpleNamespace

import pytest

from benchmarks import asha_replay
from benchmarks.tune_efficiency import processing_order

STEPS = (2, 4, 6, 8)


def curve(at2: float, final: float) -> dict:
    """A curve reporting every 2 steps to max_t 8, falling linearly from `at2` to `final`."""
    return {s: at2 + (final - at2) * (s - 2) / 6 for s in STEPS}


# With grace 2, rf 4 and max_t 8 the only rung that can stop a trial is step 2 (a report at max_t ends it).
# Order a, b, c, d one at a time, rewards = -loss at step 2:
#   a -5.0: first at the rung -> continues to 8.
#   b -6.0: cutoff = 75th percentile of [-5] = -5; -6 < -5 -> stopped at 2.
#   c -4.0: cutoff of [-5, -6] = -6 + 0.75 * 1 = -5.25 -> continues.
#   d -4.5: cutoff of [-6, -5, -4] = -5 + 0.5 * 1 = -4.5; not below it (a tie continues) -> continues.
CURVES = {"a": curve(5.0, 3.0), "b": curve(6.0, 3.5), "c": curve(4.0, 2.0), "d": curve(4.5, 1.5)}


def test_milestones_are_rays():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in [(2, 4, 24), (1, 2, 10), (10, 3, 100), (2, 4, 8)]:
        assert asha_replay.milestones(grace, rf, max_t) == [m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs]
    assert asha_replay.milestones(2, 4, 24) == [8, 2]


def test_one_at_a_time_by_hand():
    used = asha_replay.simulate(CURVES, ["a", "b", "c", "d"], 2, 4, 8)
    assert used == {"a": 8, "b": 2, "c": 8, "d": 8}
    assert asha_replay.outcome(CURVES, used, 8) == (26 / 32, True, 0.0)


def test_the_best_config_stopped_early_is_not_found():
    curves = {**CURVES, "d": curve(4.6, 1.5)}  # -4.6 < -4.5: d, best at the end, is stopped at step 2
    used = asha_replay.simulate(curves, ["a", "b", "c", "d"], 2, 4, 8)
    assert used == {"a": 8, "b": 2, "c": 8, "d": 2}
    assert asha_replay.outcome(curves, used, 8) == (20 / 32, False, 0.5)  # ASHA's best is c: 2.0 vs 1.5


def test_the_leader_at_the_rung_first_saves_more():
    # c first: b -6 < -4 stopped; a -5 < -4.5 (of [-4, -6]: -6 + 0.75 * 2) stopped; d -4.5 vs -4.5 (of
    # [-6, -5, -4]: -5 + 0.5 * 1) continues.
    used = asha_replay.simulate(CURVES, ["c", "b", "a", "d"], 2, 4, 8)
    assert used == {"c": 8, "b": 2, "a": 2, "d": 8}


def test_over_orders_is_exhaustive_for_small_grids():
    stats = asha_replay.over_orders(CURVES, 2, 4, 8, orders=100)
    assert stats["orders"] == 24 and stats["exhaustive"]
    assert 14 / 32 <= stats["p10"] <= stats["mean_compute_frac"] <= stats["p90"] <= 1.0
    # d (best at the end, second at step 2) is stopped in 4 of the 24 orders: right after c ((c, d, ., .):
    # cutoff -4), or after c and a in either order (cutoff -4.25); with b recorded too the cutoff is -4.5.
    assert stats["same_best_share"] == pytest.approx(20 / 24, abs=1e-4)  # rounded to 4 places
    # c leads the rung, so it is never stopped: a miss keeps c, 0.5 worse at the end than d.
    assert stats["max_gap"] == stats["mean_gap_when_missed"] == 0.5


def test_concurrency_with_equal_trials_decides_as_one_at_a_time():
    order = ["b", "a", "d", "c"]
    alike = asha_replay.simulate(CURVES, order, 2, 4, 8, concurrency=3, timings=[(5.0, 1.0)] * 4)
    assert alike == asha_replay.simulate(CURVES, order, 2, 4, 8)
    # Rewards at step 2: a -5.0, b -4.8, c -4.9. One at a time: b leads (continues), c is below -4.85
    # (of [-5, -4.8]) and stops. With b slow to start, the rung sees a, c (above -5: continues), then b.
    close = {"a": curve(5.0, 3.0), "b": curve(4.8, 2.5), "c": curve(4.9, 2.8)}
    assert asha_replay.simulate(close, ["a", "b", "c"], 2, 4, 8) == {"a": 8, "b": 8, "c": 2}
    slow = asha_replay.simulate(close, ["a", "b", "c"], 2, 4, 8, concurrency=3,
                                timings=[(0.0, 1.0), (10.0, 1.0), (0.0, 1.0)])
    assert slow == {"a": 8, "b": 8, "c": 8}


def test_replay_follows_ray_asha_on_random_reports():
    """Ray's scheduler and the replay, fed the same interleaved reports, stop the same trials at the same steps."""
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    rng = random.Random(3)
    for grace, rf, max_t in [(2, 4, 24), (2, 2, 16), (1, 3, 27)]:
        for _ in range(20):
            steps = list(range(grace, max_t + 1, grace)) if grace > 1 else list(range(1, max_t + 1))
            curves = {f"t{i}": {s: rng.uniform(1, 6) for s in steps} for i in range(rng.randint(3, 12))}
            # Interleave the trials' reports at random, each trial's in step order.
            cursors = {t: 0 for t in curves}
            reports = []
            while cursors:
                trial = rng.choice(sorted(cursors))
                reports.append((trial, steps[cursors[trial]]))
                cursors[trial] += 1
                if cursors[trial] == len(steps):
                    del cursors[trial]
            scheduler = AsyncHyperBandScheduler(time_attr="step", metric="val_loss", mode="min", max_t=max_t,
                                                grace_period=grace, reduction_factor=rf)
            trials = {t: SimpleNamespace(trial_id=t) for t in curves}
            for trial in trials.values():
                scheduler.on_trial_add(None, trial)
            ray_stops: dict = {}
            for trial, step in reports:
                if trial in ray_stops:
                    continue
                action = scheduler.on_trial_result(None, trials[trial], {"step": step, "val_loss": curves[trial][step]})
                if action == TrialScheduler.STOP:
                    ray_stops[trial] = step
            assert asha_replay.replay_reports(curves, reports, grace, rf, max_t) == ray_stops
            assert any(s < max_t for s in ray_stops.values())  # the case exercises early stops


def test_processing_order_reads_the_sweep_progress_lines():
    lines = ["[raylm-tune] trial ab_00001 started (2 so far): optim.lr=0.01",
             "noise", "[raylm-tune] trial ab_00001 step 2/24: val_loss 6.1",
             "[raylm-tune] trial ab_00000 step 24/24: val_loss 5.5",
             "[raylm-tune] trial ab_00000 finished at step 24 (1 ended so far)"]
    assert processing_order(lines) == [["ab_00001", 0], ["ab_00001", 2], ["ab_00000", 24]]


def test_timings_come_from_report_times():
    side = {"trials": [{"report_times": [[2, 12.0], [4, 13.0], [24, 23.0]]}, {"report_times": []}]}
    assert asha_replay.timings_of(side) == [pytest.approx((11.0, 0.5))]
