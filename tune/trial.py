"""One trial: a Tune function trainable that builds the TorchTrainer for its sampled config and fits it.

Ray 2.60 Train V2 runs the worker group under a Train controller actor; this function only
builds the trainer, fits it in a thread, and forwards to Tune what Tune may see: the reports
that carry the tuned metric (evaluations), with `step` as the scheduler's time attribute. Tune
refuses results lacking the metric, so plain log reports stay in the run's metrics.jsonl.

Where a trial's run lives (`<sweep_dir>/<trial>/<run_name>/`):
- `run`: the trial's own run. Rerunning the trial (driver resumed with --resume, trial paused
  by PBT) resumes it from its own last checkpoint: Train V2 continues a run by its name.
- `from-<trial>-step<N>`: after PBT cloned another trial's checkpoint into this one, a fresh run
  that starts from that checkpoint with this trial's (mutated) hyperparameters in effect.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

OWN_RUN = "run"
CURRENT_RUN_FILE = "current_run.txt"


class ForwardEvaluations(UserCallback):
    """Runs in the Train controller: hands rank 0's evaluation reports (and checkpoint path) to the trial.

    Only reports holding `metric` pass; the queue is bounded, so training waits for Tune to take
    each evaluation, as Ray's own TuneReportCallback does.
    """

    def __init__(self, metric: str, channel, run_name: str):
        self.metric, self.channel, self.run_name = metric, channel, run_name

    def after_report(self, run_context, metrics, checkpoint):
        record = dict(metrics[0]) if metrics else {}
        if self.metric not in record:
            return
        record["run_name"] = self.run_name
        # The run's last evaluation (its last step, or a fine-tune's early stop) ends the trial for Tune
        # too, so no scheduler acts on a finished run.
        record["done"] = record.get("step") == record.get("max_steps") or bool(record.get("early_stopped"))
        if checkpoint is not None:
            record["checkpoint_path"] = checkpoint.path
        self.channel.put(record)


def choose_run(trial_dir: Path, tune_checkpoint) -> tuple[str, str | None]:
    """(run name, initial checkpoint dir or None) for this start of the trial.

    No Tune checkpoint: the trial's own run (resumed by Train if it has checkpoints). A Tune
    checkpoint of this trial: the run that wrote it. A checkpoint another trial wrote (PBT exploit):
    a new run named after its origin, starting from it; a rerun of that start resumes the same run.
    """
    if tune_checkpoint is None:
        return OWN_RUN, None
    ckpt = Path(tune_checkpoint.path)
    current = trial_dir / CURRENT_RUN_FILE
    if ckpt.parent.resolve() == trial_dir.resolve():
        return (current.read_text().strip() if current.is_file() else OWN_RUN), None
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    return f"from-{ckpt.parent.name}-step{step}", str(ckpt)


def trial_config(base_raw: dict, sampled: dict, run_name: str, trial_dir: Path) -> dict:
    """The base run with the sampled dotted keys set, living in the trial's directory."""
    raw = copy.deepcopy(base_raw)
    for dotted, value in sampled.items():
        node = raw
        for part in dotted.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[dotted.split(".")[-1]] = value
    raw.setdefault("run", {}).update(name=run_name, storage_path=str(trial_dir), resume=True)
    return raw


def run_trial(sampled: dict, *, base_raw: dict, prepared: dict, datasets: dict, metric: str,
              report_checkpoints: bool, sweep_dir: str) -> None:
    """Tune function trainable: build this trial's TorchTrainer, fit it, forward evaluations to Tune.

    The trainer comes from the base run's own builder (training.pretrain or training.finetune).

    `report_checkpoints` (PBT): every forwarded evaluation also hands Tune the run's checkpoint, which
    Tune copies into the trial directory so that another trial can clone it. `datasets` are the Ray
    Data streams the driver built once for every trial. The trial's run lives in
    `<sweep_dir>/<trial_id>` on the sweep's storage (Tune's own trial working dir is a local staging
    copy under /tmp/ray that does not outlive the Ray session).
    """
    from ray import tune
    from ray.util.queue import Empty, Queue

    from training.config import validate_config
    from training.tracking import read_metrics
    from tune.runs import build_trainer

    trial_dir = Path(sweep_dir) / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    run_name, init_checkpoint = choose_run(trial_dir, tune.get_checkpoint())
    (trial_dir / CURRENT_RUN_FILE).write_text(run_name + "\n")
    cfg = validate_config(trial_config(base_raw, sampled, run_name, trial_dir), source=f"trial {trial_dir.name}")
    if init_checkpoint:
        print(f"[raylm-tune] {trial_dir.name}: starting {run_name} from {init_checkpoint} with {sampled}", flush=True)

    channel = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, prepared, callbacks=[ForwardEvaluations(metric, channel, run_name)],
                            datasets=datasets, init_checkpoint=init_checkpoint)

    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the trial thread, so Tune marks the trial failed
            outcome["error"] = err

    fitter = threading.Thread(target=fit, name="raylm-trial-fit", daemon=True)
    fitter.start()
    forwarded = 0
    while fitter.is_alive() or not channel.empty():
        try:
            record = channel.get(timeout=0.5)
        except Empty:
            continue
        if record["done"]:
            # Tune ends the trial on its last result; let the run finish (and free its workers) first.
            fitter.join()
        checkpoint = None
        if report_checkpoints and record.get("checkpoint_path"):
            checkpoint = tune.Checkpoint.from_directory(record["checkpoint_path"])
        tune.report(record, checkpoint=checkpoint)
        forwarded += 1
    fitter.join()
    if "error" in outcome:
        raise outcome["error"]
    if not forwarded:
        # The run had already finished (the trial was restarted after its last report): hand Tune the
        # last evaluation from the run's own log so the trial has its final metric.
        evals = [r for r in read_metrics(cfg.run_dir) if metric in r]
        if evals:
            tune.report({**evals[-1], "run_name": run_name})
    channel.shutdown()
