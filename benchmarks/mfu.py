"""This machine's fp32 matmul peak, and the model FLOPs utilization (MFU) of pretraining a ~50M Llama.

    python -m benchmarks.mfu [--threads 2 --hidden 768 --layers 6 --steps 8 --matmul-size 2048]

Peak: the best FLOP/s of large square fp32 `torch.matmul`s (2 n^3 FLOPs each) over many ~0.3 s
trials: some before training, one after every training step, some after. On a machine shared with
other jobs both the peak and the step times swing with the load; interleaving lets both sample the
same spells, and the headline MFU compares the best step with the best trial (the same estimator on
both sides). The median step and a CPU-time normalization are reported next to it.

Training: one process, the real raylm model (`training.model.build_model`) inside a real DeepSpeed
engine built by `training.engine.build_engine` (world size 1, gloo), with
raylm's AdamW groups and lr schedule: forward, backward and optimizer step on random token ids
(throughput does not depend on the token values). The first steps are warm-up and excluded.

FLOPs per token = 6N + 12*L*d*T (Kaplan et al. 2020 / PaLM appendix B): 6N for the matmuls of
forward (2N) and backward (4N), 12*L*d*T for the attention scores and the weighted sum. N counts
ALL parameters, the tied embedding once: with tied embeddings the embedding matrix is the LM-head
matmul (2*d*V FLOPs per token forward), so it does real work; the non-embedding variant is
reported too. MFU = achieved model FLOP/s / measured peak FLOP/s.

2 workers under Ray are not measured here: they would split the same 2 cores (1 thread each), and
`benchmarks.train_overhead` measures that path's throughput against a bare loop.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "mfu.json"


class MatmulPeak:
    """Timed trials of large square fp32 matmuls (2 n^3 FLOPs each); wall and CPU-time FLOP/s per trial."""

    def __init__(self, size: int, threads: int, trial_s: float = 0.3):
        import torch

        torch.set_num_threads(threads)
        self.size, self.threads = size, threads
        self.a = torch.randn(size, size, dtype=torch.float32)
        self.b = torch.randn(size, size, dtype=torch.float32)
        self.out = torch.empty(size, size, dtype=torch.float32)
        torch.matmul(self.a, self.b, out=self.out)  # warm-up: thread pool and kernel selection
        start = time.perf_counter()
        torch.matmul(self.a, self.b, out=self.out)
        self.reps = max(1, int(trial_s / max(time.perf_counter() - start, 1e-6)))
        self.wall_gflops: list[float] = []
        self.cpu_gflops: list[float] = []

    def trial(self) -> float:
        """One trial of `reps` matmuls; returns its wall-clock GFLOP/s."""
        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.reps):
            torch.matmul(self.a, self.b, out=self.out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        gflop = 2 * self.size**3 * self.reps / 1e9
        self.wall_gflops.append(gflop / wall)
        # Per core-second of this process: insensitive to time spent descheduled by other users' jobs.
        self.cpu_gflops.append(gflop / cpu * self.threads if cpu > 0 else float("nan"))
        return self.wall_gflops[-1]

    def summary(self) -> dict:
        return {"size": self.size, "threads": self.threads, "reps_per_trial": self.reps,
                "gflops_trials": self.wall_gflops, "best_gflops": max(self.wall_gflops),
                "median_gflops": statistics.median(self.wall_gflops),
                "cpu_time_gflops_trials": self.cpu_gflops, "best_cpu_time_gflops": max(self.cpu_gflops)}


def matmul_peak(size: int, trials: int, threads: int) -> dict:
    """Best fp32 GFLOP/s of `size`x`size` matmuls over `trials` timed trials (each ~0.3 s or more)."""
    peak = MatmulPeak(size, threads)
    for _ in range(trials):
        peak.trial()
    return peak.summary()


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> int:
    """6N + 12*L*d*T training FLOPs per token."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_throughput(hidden: int, layers: int, heads: int, vocab: int, seq_len: int, micro_batch: int,
                     steps: int, warmup: int, threads: int, zero_stage: int, between_steps=None) -> dict:
    """Per-step times of a 1-process DeepSpeed pretraining loop on the raylm model; tokens/s after warm-up.

    `between_steps`, if given, is called after every step (the peak trials interleave with the steps
    so that both sample the same spells of load on a shared machine).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from training.config import PretrainConfig
    from training.engine import build_engine
    from training.model import build_model, count_parameters

    torch.set_num_threads(threads)
    cfg = PretrainConfig.model_validate({
        "model": {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "max_position_embeddings": seq_len},
        "data": {"train_files": ["unused.txt"], "seq_len": seq_len},  # never read: random token ids
        "optim": {"micro_batch_size": micro_batch, "max_steps": steps + 10, "warmup_steps": 2},
        "deepspeed": {"zero_stage": zero_stage, "precision": "fp32"},
        "scaling": {"num_workers": 1},
    })
    own_group = not dist.is_initialized()
    if own_group:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(cfg.model, vocab, pad_token_id=1, eos_token_id=0, seed=0)
    n_params = count_parameters(model)
    n_embedding = model.get_input_embeddings().weight.numel()
    engine = build_engine(model, cfg, 1)
    gen = torch.Generator().manual_seed(0)
    step_times, step_cpu_times, losses = [], [], []
    for _ in range(steps):
        ids = torch.randint(2, vocab, (micro_batch, seq_len), generator=gen)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # .item() waits for the step: nothing is left in flight
        step_times.append(time.perf_counter() - start)
        step_cpu_times.append(time.process_time() - cpu_start)
        if between_steps is not None:
            between_steps()
    engine.destroy()
    if own_group:
        dist.destroy_process_group()
    timed = step_times[warmup:]
    tokens_per_step = micro_batch * seq_len
    return {
        "n_params": n_params, "n_embedding_params": n_embedding, "n_non_embedding_params": n_params - n_embedding,
        "hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab, "seq_len": seq_len,
        "micro_batch": micro_batch, "tokens_per_step": tokens_per_step, "zero_stage": zero_stage, "threads": threads,
        "warmup_steps": warmup, "step_times_s": step_times, "step_cpu_times_s": step_cpu_times, "losses": losses,
        "median_step_s": statistics.median(timed), "best_step_s": min(timed),
        "tokens_per_s": tokens_per_step / statistics.median(timed),
        "tokens_per_s_best_step": tokens_per_step / min(timed),
        # Per core-second: tokens per CPU-second of the process times the cores it may use.
        "tokens_per_s_cpu_time": tokens_per_step * threads / statistics.median(step_cpu_times[warmup:]),
        "tokens_per_s_mean_time": tokens_per_step * len(timed) / sum(timed),
    }


def compute_mfu(train: dict, peak: dict) -> dict:
    """MFU three ways (all with N = all parameters; the non-embedding variant for the headline too).

    mfu            best training step / best peak trial: both taken in the least-contended moment
                   they met, the same estimator on both sides of the ratio (headline)
    mfu_median     median step / best peak trial: pessimistic on a shared machine
    mfu_cpu_time   per CPU-second of the process on both sides: ignores time spent descheduled
    """
    fpt = flops_per_token(train["n_params"], train["layers"], train["hidden"], train["seq_len"])
    fpt_ne = flops_per_token(train["n_non_embedding_params"], train["layers"], train["hidden"], train["seq_len"])
    best = fpt * train["tokens_per_s_best_step"] / 1e9
    median = fpt * train["tokens_per_s"] / 1e9
    cpu = fpt * train["tokens_per_s_cpu_time"] / 1e9
    return {
        "flops_per_token": fpt, "flops_per_token_non_embedding": fpt_ne,
        "achieved_gflops": best, "achieved_gflops_median": median, "achieved_gflops_cpu_time": cpu,
        "mfu": best / peak["best_gflops"],
        "mfu_non_embedding": fpt_ne * train["tokens_per_s_best_step"] / 1e9 / peak["best_gflops"],
        "mfu_median": median / peak["best_gflops"],
        "mfu_cpu_time": cpu / peak["best_cpu_time_gflops"],
        "attention_flops_share": 12 * train["layers"] * train["hidden"] * train["seq_len"] / fpt,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mfu", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-trials", type=int, default=5, help="trials before and after training "
                        "(one more runs after every training step)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--out", default=str(RESULTS_PATH), help="JSON results path ('' to skip writing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_start, started = os.getloadavg(), time.time()
    peak = MatmulPeak(args.matmul_size, args.threads)
    for _ in range(args.matmul_trials):
        peak.trial()
    print(f"matmul peak before training: {max(peak.wall_gflops):.1f} GFLOP/s (n={args.matmul_size}, "
          f"{args.threads} threads, trials {[round(x, 1) for x in peak.wall_gflops]})", flush=True)
    train = train_throughput(args.hidden, args.layers, args.heads, args.vocab, args.seq_len, args.micro_batch,
                             args.steps, args.warmup, args.threads, args.zero_stage, between_steps=peak.trial)
    print(f"model: {train['n_params'] / 1e6:.1f}M params ({train['n_non_embedding_params'] / 1e6:.1f}M non-embedding), "
          f"L={args.layers} d={args.hidden} T={args.seq_len}, {train['tokens_per_step']} tokens/step; "
          f"step times {[round(t, 2) for t in train['step_times_s']]} s")
    for _ in range(args.matmul_trials):
        peak.trial()
    peak_summary = peak.summary()
    print(f"matmul peak, all {len(peak.wall_gflops)} trials (interleaved with the steps): best "
          f"{peak_summary['best_gflops']:.1f}, median {peak_summary['median_gflops']:.1f} GFLOP/s")
    mfu = compute_mfu(train, peak_summary)
    result = {
        "peak": peak_summary, "train": train, **mfu, "precision": "fp32", "processes": 1, "ray_workers_tried": False,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.time() - started,
    }
    print(f"achieved {mfu['achieved_gflops']:.1f} GFLOP/s (best step; median step {mfu['achieved_gflops_median']:.1f}) "
          f"x {mfu['flops_per_token'] / 1e6:.1f} MFLOP/token; MFU best/best {mfu['mfu']:.3f}, median {mfu['mfu_median']:.3f}, "
          f"CPU-time {mfu['mfu_cpu_time']:.3f}; non-embedding N {mfu['mfu_non_embedding']:.3f}; "
          f"load avg {load_start[0]:.2f} -> {result['loadavg_end'][0]:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"mfu={mfu['mfu']:.4f} peak_gflops={peak_summary['best_gflops']:.1f} achieved_gflops={mfu['achieved_gflops']:.1f} "
          f"mfu_median={mfu['mfu_median']:.4f} mfu_cpu_time={mfu['mfu_cpu_time']:.4f} "
          f"mfu_non_embedding={mfu['mfu_non_embedding']:.4f} tokens_per_s={train['tokens_per_s_best_step']:.1f} "
          f"n_params={train['n_params']} threads={args.threads}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
