"""The sweep's console: one raylm line per trial event instead of Tune's status table every 30 s.

Tune's own reporter (RunConfig verbose >= 1) reprints a table of every trial twice a minute, which buries
what changed. The sweep runs Tune at verbose=0 on its legacy output engine (`sweep_console`: Ray 2.60's
newer one still prints a configuration box, a TensorBoard hint and a final status table at verbose=0) and
`SweepProgress` says, as they happen, which trial started with which values, each evaluation it reported,
and how it ended. Ray's lines go to the sweep directory's driver.log (training.console); Tune's full logs
and results stay in the sweep directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ray.tune import Callback

from training.console import CONSOLE_ENV, DRIVER_LOG, full_console, keep_driver_logs, link_ray_logs

TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # "0": Tune's legacy output engine, which prints nothing at verbose=0


@contextlib.contextmanager
def sweep_console(sweep_dir: Path):
    """Within: Tune prints nothing of its own at verbose=0, Ray's lines go to `<sweep_dir>/driver.log` (the
    console keeps raylm's lines, warnings and errors), and `<sweep_dir>/ray_logs` links the Ray session's
    logs; one line says where they are. RAYLM_CONSOLE=full leaves Tune's output engine as it is."""
    previous = os.environ.get(TUNE_OUTPUT_ENV)
    if not full_console():
        os.environ[TUNE_OUTPUT_ENV] = "0"  # read by tune.run when fit() starts
    try:
        with keep_driver_logs(Path(sweep_dir) / DRIVER_LOG) as driver_log:
            logs = link_ray_logs(sweep_dir)
            print(f"[raylm-tune] Ray's logs: {driver_log} (what Ray and Tune printed here)"
                  + (f", {logs}/ (every Ray process)" if logs else "") + f"; {CONSOLE_ENV}=full prints it all "
                  "on the console", flush=True)
            yield driver_log
    finally:
        if previous is None:
            os.environ.pop(TUNE_OUTPUT_ENV, None)
        else:
            os.environ[TUNE_OUTPUT_ENV] = previous


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
