"""The sweep's console: one raylm line per trial event instead of Tune's status table every 30 s.

Tune's own reporter (RunConfig verbose >= 1) reprints a table of every trial twice a minute, which buries
what changed; the sweep runs it at verbose=0 (Ray 2.60 then prints only its configuration box at the start
and one status table at the end, and errors) and this callback says, as they happen, which trial started
with which values, each evaluation it reported, and how it ended. Tune's full logs stay in the sweep directory.
"""

from __future__ import annotations

from ray.tune import Callback


def _values(config: dict, keys: list[str]) -> str:
    return ", ".join(f"{key}={config.get(key)!r}" for key in keys)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepProgress(Callback):
    """Prints `[raylm-tune] trial <id> ...` lines on the driver for a sweep tuning `metric` over `keys`."""

    def __init__(self, metric: str, keys: list[str], max_t: int):
        # Plain data only: Tune pickles its callbacks into the sweep's state (tuner.pkl) for --resume.
        self.metric, self.keys, self.max_t = metric, keys, max_t

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[raylm-tune] trial {trial.trial_id} started ({len(trials)} so far): "
                   f"{_values(trial.config, self.keys)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result:  # trials forward evaluation reports only; anything else is not news
            print(f"[raylm-tune] trial {trial.trial_id} step {result.get('step')}/{self.max_t}: "
                       f"{self.metric} {_number(result[self.metric])}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step")
        if step is not None and step >= self.max_t:
            ended = "finished"
        else:
            ended = "stopped by its run's early stopping" if last.get("early_stopped") else "stopped by the scheduler"
        # Tune marks the trial TERMINATED only after its callbacks ran: it is counted here.
        ended_so_far = 1 + sum(t.status == "TERMINATED" for t in trials if t is not trial)
        print(f"[raylm-tune] trial {trial.trial_id} {ended} at step {step} ({ended_so_far} ended so far)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[raylm-tune] trial {trial.trial_id} failed; its error is in {trial.local_path}", flush=True)
