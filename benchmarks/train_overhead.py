"""Throughput cost of raylm's Ray Train loop: `training.pretrain` vs. a bare DeepSpeed loop without Ray.

    python -m benchmarks.train_overhead [--runs 3 --steps 32 --warmup 10 --hidden 256 --layers 4 --seq-len 128]

raylm side: the real command, `python -m training.pretrain --config configs/pretrain/demo_cpu.yaml`
with `--set` overrides (model size, steps, no intermediate checkpoint/eval), in a subprocess that
starts and stops its own local Ray. 2 workers x {CPU: 1}: Ray sets OMP_NUM_THREADS=1 in each.

bare side: `world` processes (torch.multiprocessing, gloo on 127.0.0.1, torch.set_num_threads equal
to the per-worker CPU reservation) that build the same model, DeepSpeed config, AdamW groups and lr
schedule with raylm's own builders, and train on the same prepared Parquet blocks in the same
order (each rank its slice of every global batch), with nothing else in the loop.

Both sides are timed over the same steps, from the end of step `a` to the end of step `b`
(a = first reported step >= warmup, b = last reported step before the final one, which also
evaluates and checkpoints), on the wall clock of rank 0:
  raylm: timestamps of rank 0's "Reporting training result" lines in Ray Train's worker log
         (written inside every `ray.train.report`, so the report cost is included). The run's own
         `tokens_per_s` metric is recorded too, but it restarts its clock after each report and so
         leaves the report call out.
  bare:  time.perf_counter() after `engine.step()` of those steps.
Runs alternate A,B,B,A,A,B,... so that drift in the machine's load hits both sides alike.

On a machine shared with other jobs the wall clock mostly measures how long the training processes
waited for a core. Both sides therefore also report tokens per CPU-second of the training
processes (summed over ranks, over the same span): raylm's workers are sampled from /proc when rank
0 logs the report of step a and of step b; the bare ranks read time.process_time(). This
`ratio_cpu` isolates the work raylm adds inside the worker processes (Ray Data iteration, report(),
metrics). It does not see time spent blocked (report barrier, result queue): the wall-clock `ratio`
and `report_overhead_s_per_report` cover that. `ratio_cpu_all_ray_processes` also charges raylm
with the CPU of every process of its local Ray (raylet, GCS, dashboard, controller, Ray Data tasks;
all descendants of the driver), which on 2 cores is CPU the training does not get.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "train_overhead.json"
BASE_CONFIG = REPO_ROOT / "configs" / "pretrain" / "demo_cpu.yaml"
NEVER = 10**9  # a step interval that never triggers (checkpoint/eval only at the last step)
_REPORT_LINE = re.compile(r"Reporting training result \d+: .*?'step': (\d+),")


def free_port() -> int:
    """A free TCP port on the loopback interface for the gloo rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_overrides(args, run_name: str) -> list[str]:
    """`--set` overrides shared by both sides (the bare side reads the same resolved config)."""
    workdir = Path(args.workdir).resolve()
    return [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
        f"model.max_position_embeddings={max(args.seq_len, 64)}",
        f"data.seq_len={args.seq_len}", f"data.prepared_dir={workdir / 'data'}",
        f"data.max_documents={args.max_documents}" if args.max_documents else "data.max_documents=null",
        f"tokenizer.vocab_size={args.vocab}",
        f"optim.max_steps={args.steps}", f"optim.warmup_steps={min(args.warmup, args.steps - 1)}",
        f"optim.micro_batch_size={args.micro_batch}", "optim.grad_accum_steps=1",
        f"deepspeed.zero_stage={args.zero_stage}",
        f"scaling.num_workers={args.workers}", f"scaling.resources_per_worker={{CPU: {args.cpus_per_worker}}}",
        f"run.name={run_name}", f"run.storage_path={workdir / 'runs'}", f"run.log_every_steps={args.log_every}",
        f"run.checkpoint_every_steps={NEVER}", f"run.eval_every_steps={NEVER}", "run.eval_batches=1",
        "run.max_failures=0", "run.resume=false",
    ]


def measured_span(args) -> tuple[int, int]:
    """(a, b): time from the end of step a to the end of step b, both reported steps, b < max_steps."""
    reported = [s for s in range(1, args.steps) if s % args.log_every == 0]
    a = next((s for s in reported if s >= args.warmup), None)
    b = reported[-1] if reported else None
    if a is None or b is None or b <= a:
        raise ValueError(f"--steps {args.steps} / --warmup {args.warmup} / --log-every {args.log_every} leave no "
                         "two reported steps after warm-up and before the last step; raise --steps")
    return a, b


def prepare(args) -> tuple[str, dict]:
    """Tokenize and pack the corpus once (cached by fingerprint); both sides then read the same blocks."""
    from dataclasses import asdict

    from training.config import load_config
    from training.data import prepare_data

    cfg = load_config(BASE_CONFIG, run_overrides(args, "prepare"))
    prepared = prepare_data(cfg)
    return str(BASE_CONFIG), {k: v for k, v in asdict(prepared).items() if k != "stats"}


def ray_train_worker_logs(since: float) -> list[str]:
    """Ray Train's application worker logs modified since `since`, each file once (session_latest is a link).

    Other users' Ray sessions come and go on a shared machine: a file may vanish between listing and reading.
    """
    tmp_root = os.environ.get("RAY_TMPDIR", "/tmp/ray")
    paths = set()
    for path in glob.glob(f"{tmp_root}/session_*/logs/train/ray-train-app-worker-*.log"):
        try:
            if os.path.getmtime(path) >= since:
                paths.add(os.path.realpath(path))
        except OSError:
            continue
    return sorted(paths)


def worker_report_times(run_name: str, since: float, rank: int = 0) -> dict[int, float]:
    """step -> wall time (s) of `rank`'s "Reporting training result" log line, from Ray Train's worker logs."""
    times: dict[int, float] = {}
    for path in ray_train_worker_logs(since):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.readlines()
        except OSError:
            continue
        for line in lines:
            if "Reporting training result" not in line or f'"{run_name}"' not in line:
                continue
            rec = json.loads(line)
            match = _REPORT_LINE.search(rec.get("message", ""))
            if rec.get("run_name") == run_name and rec.get("world_rank") == rank and match:
                times[int(match.group(1))] = rec["timestamp_ns"] / 1e9
    return times


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_label(pid: int) -> str:
    """What a process is, for the CPU census: Ray's actor/task title (ray::RayTrainWorker), else the
    program or Python module it runs (raylet, gcs_server, dashboard.py, agent.py)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    if "-c" in words[1:2]:
        return "python -c"
    for word in words[1:3] if "python" in Path(words[0]).name else []:
        if word.endswith(".py"):
            return Path(word).name
        if not word.startswith("-"):
            break
    if "-m" in words[:3]:
        return words[words.index("-m") + 1]
    return Path(words[0]).name


def process_tree_cpu(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds) of a process and all its live descendants (a local Ray started by
    it: raylet, GCS, dashboard, controller, Ray Data tasks, Train workers), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(Path(stat_path).read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat_path.split("/")[2]))
    tree, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        tree[pid] = (process_label(pid), process_cpu_seconds(pid) or 0.0)
        stack.extend(children.get(pid, []))
    return tree


def process_tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of a process and all its live descendants."""
    return sum(cpu for _, cpu in process_tree_cpu(root_pid).values())


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process burned between two censuses (processes started in between count
    from zero), largest first."""
    spent: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        spent[label] = spent.get(label, 0.0) + cpu - before.get(pid, (label, 0.0))[1]
    return dict(sorted(spent.items(), key=lambda item: -item[1]))


class WorkerCpuSampler:
    """Follows Ray Train's worker logs of one run; samples the workers' CPU time when rank 0 reports a step.

    The CPU seconds the training processes spend between two steps do not depend on how long
    other users' jobs kept them waiting for a core, unlike the wall clock on a shared machine.
    """

    def __init__(self, run_name: str, since: float, steps: tuple[int, int], driver_pid: int | None = None,
                 workers: int = 1):
        self.run_name, self.since, self.steps, self.driver_pid = run_name, since, set(steps), driver_pid
        self.workers = workers
        self.offsets: dict[str, int] = {}
        self.worker_pids: dict[int, int] = {}  # world rank -> pid
        self.cpu_at_step: dict[int, float] = {}
        self.tree_cpu_at_step: dict[int, dict[int, tuple[str, float]]] = {}
        self.paths: list[str] = []
        self.globbed_at = 0.0

    def poll(self) -> None:
        # Listing every Ray session's logs costs ~9 ms on a machine with a few hundred old sessions:
        # at a 50 ms poll that alone took ~15% of a core from the raylm side. List again only while
        # this run's worker logs are not all found yet, at most once a second.
        if len(self.worker_pids) < self.workers and time.monotonic() - self.globbed_at >= 1.0:
            self.paths, self.globbed_at = ray_train_worker_logs(self.since), time.monotonic()
        for path in self.paths:
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(self.offsets.get(path, 0))
                    chunk = fh.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind("\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete.encode("utf-8"))
            for line in complete.splitlines():
                if f'"{self.run_name}"' not in line:
                    continue
                rec = json.loads(line)
                if rec.get("run_name") != self.run_name or "world_rank" not in rec:
                    continue
                self.worker_pids[rec["world_rank"]] = rec["process"]
                match = _REPORT_LINE.search(rec.get("message", ""))
                if match and rec["world_rank"] == 0 and int(match.group(1)) in self.steps:
                    cpu = [process_cpu_seconds(pid) for pid in self.worker_pids.values()]
                    if None not in cpu:
                        self.cpu_at_step[int(match.group(1))] = sum(cpu)
                    if self.driver_pid is not None:
                        self.tree_cpu_at_step[int(match.group(1))] = process_tree_cpu(self.driver_pid)


def run_raylm(args, run_name: str, log_path: Path) -> dict:
    """One real `training.pretrain` run in a subprocess; tokens/s over the measured span."""
    from training.tracking import read_metrics

    a, b = measured_span(args)
    cmd = [sys.executable, "-m", "training.pretrain", "--config", str(BASE_CONFIG)]
    for item in run_overrides(args, run_name):
        cmd += ["--set", item]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    env.pop("OMP_NUM_THREADS", None)  # Ray sets it per worker from the CPU reservation
    env.pop("RAY_ADDRESS", None)  # always a private local Ray, never someone else's cluster
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = WorkerCpuSampler(run_name, started, (a, b), driver_pid=proc.pid, workers=args.workers)
        try:
            while proc.poll() is None:
                sampler.poll()
                if time.time() - started > args.timeout:
                    raise TimeoutError(f"training.pretrain ran over {args.timeout} s; see {log_path}")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # SIGINT lets the driver shut its Ray down
                proc.wait(timeout=60)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training.pretrain exited {proc.returncode}; see {log_path}")
    run_dir = Path(args.workdir).resolve() / "runs" / run_name
    records = {r["step"]: r for r in read_metrics(run_dir)}
    tokens_per_step = records[b]["tokens_seen"] // b
    stamps = worker_report_times(run_name, started)
    result = {"run_name": run_name, "wall_s": wall, "span": [a, b], "tokens_per_step": tokens_per_step}
    inside = [records[s] for s in range(a + 1, b + 1) if s in records]
    # The run's own metric: tokens over the summed step windows (report() calls left out).
    compute_s = sum(r["step_time_s"] * min(args.log_every, r["step"] - a) for r in inside)
    result["self_reported_tokens_per_s"] = tokens_per_step * (b - a) / compute_s
    if a in stamps and b in stamps:
        result["tokens_per_s"] = tokens_per_step * (b - a) / (stamps[b] - stamps[a])
        result["timing_source"] = "worker log"
        result["span_s"] = stamps[b] - stamps[a]
    else:  # Ray Train's log format changed: fall back on the controller's receive times (+-2 s poll)
        result["tokens_per_s"] = tokens_per_step * (b - a) / (records[b]["time"] - records[a]["time"])
        result["timing_source"] = "controller poll (coarse)"
        result["span_s"] = records[b]["time"] - records[a]["time"]
    result["report_overhead_s_per_report"] = (result["span_s"] - compute_s) / max(1, len(inside))
    if a in sampler.cpu_at_step and b in sampler.cpu_at_step:
        result["worker_cpu_s"] = sampler.cpu_at_step[b] - sampler.cpu_at_step[a]
        result["tokens_per_cpu_s"] = tokens_per_step * (b - a) / result["worker_cpu_s"]
    if a in sampler.tree_cpu_at_step and b in sampler.tree_cpu_at_step:
        # Everything this run's Ray burns on the shared cores, workers included.
        spent = cpu_by_label(sampler.tree_cpu_at_step[a], sampler.tree_cpu_at_step[b])
        result["cpu_s_by_process"] = {label: round(cpu, 3) for label, cpu in spent.items() if cpu >= 0.005}
        result["ray_tree_cpu_s"] = sum(spent.values())
        result["tokens_per_tree_cpu_s"] = tokens_per_step * (b - a) / result["ray_tree_cpu_s"]
    result["final_loss"] = records[max(records)]["loss"]
    return result


def _bare_rank(rank: int, world: int, port: int, threads: int, niceness: int, config_path: str,
               overrides: list[str], prepared: dict, steps: int, out_dir: str) -> None:
    """One rank of the bare loop: same builders, same blocks, no Ray."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS=str(threads))
    import deepspeed
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from training.config import load_config
    from training.engine import build_engine
    from training.model import build_model

    torch.set_num_threads(threads)
    # Ray starts its workers at niceness 15 (RAY_worker_niceness); on a shared machine a bare loop at
    # niceness 0 would take CPU from everything niced, raylm's own workers included.
    os.nice(niceness - os.nice(0))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(config_path, overrides)
    model = build_model(cfg.model, prepared["vocab_size"], prepared["pad_token_id"], prepared["eos_token_id"], cfg.run.seed)
    engine = build_engine(model, cfg, world)
    column = pq.read_table(prepared["train_path"], columns=["input_ids"]).column("input_ids").combine_chunks()
    blocks = np.asarray(column.values).reshape(len(column), -1).copy()  # writable, as Ray Data's batches
    per_rank = cfg.optim.micro_batch_size
    global_rows = per_rank * world
    n_batches = len(blocks) // global_rows
    ends, cpu_ends, losses = [], [], []
    for step in range(steps):
        start_row = (step % n_batches) * global_rows + rank * per_rank
        ids = torch.as_tensor(blocks[start_row:start_row + per_rank], dtype=torch.long)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())  # this process, all threads
        losses.append(loss.item())
    Path(out_dir, f"bare_r{rank}.json").write_text(json.dumps({"ends": ends, "cpu_ends": cpu_ends, "losses": losses, "threads": torch.get_num_threads(),
                                                                 "niceness": os.nice(0)}))
    dist.barrier()
    dist.destroy_process_group()


def run_bare(args, config_path: str, prepared: dict, run_name: str) -> dict:
    """One bare DeepSpeed run (`workers` spawned processes); tokens/s over the measured span."""
    import tempfile

    import torch.multiprocessing as mp

    a, b = measured_span(args)
    threads = max(1, int(args.cpus_per_worker))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="raylm-bare-") as out_dir:
        mp.spawn(_bare_rank, nprocs=args.workers, join=True,
                 args=(args.workers, free_port(), threads, args.bare_niceness, config_path, run_overrides(args, run_name), prepared,
                       args.steps, out_dir))
        ranks = [json.loads(Path(out_dir, f"bare_r{r}.json").read_text()) for r in range(args.workers)]
    rank0 = ranks[0]
    tokens_per_step = args.micro_batch * args.workers * args.seq_len
    span = rank0["ends"][b - 1] - rank0["ends"][a - 1]  # ends[k-1] = end of step k
    cpu = sum(r["cpu_ends"][b - 1] - r["cpu_ends"][a - 1] for r in ranks)
    return {"run_name": run_name, "wall_s": time.time() - started, "span": [a, b], "span_s": span,
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step * (b - a) / span,
            "worker_cpu_s": cpu, "tokens_per_cpu_s": tokens_per_step * (b - a) / cpu,
            "threads_per_process": rank0["threads"], "niceness": rank0["niceness"], "final_rank0_loss": rank0["losses"][-1]}


def summarize(raylm: list[dict], bare: list[dict]) -> dict:
    """Medians, spreads and the ratio of medians (plus the ratio within each adjacent pair)."""
    def stats(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}

    ray_tps = [r["tokens_per_s"] for r in raylm]
    bare_tps = [r["tokens_per_s"] for r in bare]
    pair_ratios = [r / b for r, b in zip(ray_tps, bare_tps)]
    ray_cpu = [r["tokens_per_cpu_s"] for r in raylm if "tokens_per_cpu_s" in r]
    bare_cpu = [r["tokens_per_cpu_s"] for r in bare if "tokens_per_cpu_s" in r]
    cpu_stats = {}
    if ray_cpu and bare_cpu:
        cpu_stats = {"raylm_tokens_per_cpu_s": stats(ray_cpu), "bare_tokens_per_cpu_s": stats(bare_cpu),
                     "ratio_cpu": statistics.median(ray_cpu) / statistics.median(bare_cpu)}
        ray_tree = [r["tokens_per_tree_cpu_s"] for r in raylm if "tokens_per_tree_cpu_s" in r]
        if ray_tree:
            cpu_stats.update(raylm_tokens_per_tree_cpu_s=stats(ray_tree),
                             ratio_cpu_all_ray_processes=statistics.median(ray_tree) / statistics.median(bare_cpu))
    census = [r["cpu_s_by_process"] for r in raylm if "cpu_s_by_process" in r]
    if census:
        # Where the CPU of raylm's side went over the measured span: median seconds per kind of process.
        labels = {label for run in census for label in run}
        medians = {label: statistics.median(run.get(label, 0.0) for run in census) for label in labels}
        cpu_stats["raylm_cpu_s_by_process"] = dict(sorted(medians.items(), key=lambda item: -item[1]))
    return {
        **cpu_stats,
        "raylm_tokens_per_s": stats(ray_tps),
        "raylm_self_reported_tokens_per_s": stats([r["self_reported_tokens_per_s"] for r in raylm]),
        "bare_tokens_per_s": stats(bare_tps),
        "ratio": statistics.median(ray_tps) / statistics.median(bare_tps),
        "ratio_self_reported": statistics.median([r["self_reported_tokens_per_s"] for r in raylm]) / statistics.median(bare_tps),
        "pair_ratios": stats(pair_ratios),
        "report_overhead_s_per_report": stats([r["report_overhead_s_per_report"] for r in raylm]),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side (interleaved)")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from timing")
    parser.add_argument("--log-every", type=int, default=10, help="run.log_every_steps (one ray.train.report per N steps)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000, help="tokenizer.vocab_size")
    parser.add_argument("--max-documents", type=int, default=0, help="data.max_documents (0 = whole corpus)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--bare-niceness", type=int, default=15,
                        help="niceness of the bare processes (Ray's worker default is 15)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per raylm run before giving up")
    parser.add_argument("--workdir", default="/tmp/raylm-bench-train-overhead")
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results path ('' to skip writing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    measured_span(args)  # fail fast on a span with nothing to time
    load_start, started = os.getloadavg(), time.time()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    config_path, prepared = prepare(args)
    raylm, bare, order = [], [], []
    tag = f"{os.getpid()}-{int(started)}"
    for i in range(args.runs):
        sides = ("raylm", "bare") if i % 2 == 0 else ("bare", "raylm")
        for side in sides:
            name = f"overhead-{side}-{tag}-{i}"
            load = os.getloadavg()[0]
            if side == "raylm":
                rec = run_raylm(args, name, Path(args.workdir) / f"{name}.log")
                raylm.append(rec)
            else:
                rec = run_bare(args, config_path, prepared, name)
                bare.append(rec)
            rec["loadavg_1m_before"] = load
            order.append(side)
            print(f"[{len(order)}/{2 * args.runs}] {side:5s}: {rec['tokens_per_s']:8.1f} tok/s over steps "
                  f"{rec['span'][0]}->{rec['span'][1]} ({rec['span_s']:.1f} s, load {load:.1f})"
                  + f"; {rec.get('tokens_per_cpu_s', float('nan')):.1f} tok per worker-CPU-s"
                  + (f" ({rec.get('tokens_per_tree_cpu_s', float('nan')):.1f} per CPU-s of all its Ray processes)"
                     if side == "raylm" else "")
                  + (f"; self-reported {rec['self_reported_tokens_per_s']:.1f} tok/s, "
                     f"report overhead {rec['report_overhead_s_per_report']:.3f} s/report" if side == "raylm" else ""),
                  flush=True)
    summary = summarize(raylm, bare)
    result = {
        **summary, "order": order, "raylm_runs": raylm, "bare_runs": bare,
        "setup": {"config": str(BASE_CONFIG.relative_to(REPO_ROOT)), "overrides": run_overrides(args, "<run>"),
                  "workers": args.workers, "threads_per_worker": max(1, int(args.cpus_per_worker)),
                  "bare_niceness": args.bare_niceness,
                  "steps": args.steps, "warmup": args.warmup, "log_every_steps": args.log_every,
                  "span": list(measured_span(args))},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.time() - started,
    }
    s = summary
    print(f"raylm {s['raylm_tokens_per_s']['median']:.1f} tok/s [{s['raylm_tokens_per_s']['min']:.1f}, "
          f"{s['raylm_tokens_per_s']['max']:.1f}] (self-reported {s['raylm_self_reported_tokens_per_s']['median']:.1f}) vs "
          f"bare {s['bare_tokens_per_s']['median']:.1f} tok/s [{s['bare_tokens_per_s']['min']:.1f}, "
          f"{s['bare_tokens_per_s']['max']:.1f}]; pair ratios {[round(x, 3) for x in s['pair_ratios']['values']]}; "
          f"load avg {load_start[0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    if "raylm_cpu_s_by_process" in s:
        print("raylm side, CPU seconds over the span by process (median): " + ", ".join(
            f"{label} {cpu:.2f}" for label, cpu in list(s["raylm_cpu_s_by_process"].items())[:10]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"ratio={s['ratio']:.4f} raylm_tokens_per_s={s['raylm_tokens_per_s']['median']:.1f} "
          f"bare_tokens_per_s={s['bare_tokens_per_s']['median']:.1f} pair_ratio_min={s['pair_ratios']['min']:.4f} "
          f"pair_ratio_max={s['pair_ratios']['max']:.4f} ratio_self_reported={s['ratio_self_reported']:.4f} "
          f"ratio_cpu={s.get('ratio_cpu', float('nan')):.4f} "
          f"ratio_cpu_all_ray_processes={s.get('ratio_cpu_all_ray_processes', float('nan')):.4f} "
          f"runs={args.runs} log_every={args.log_every}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
