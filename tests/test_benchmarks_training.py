"""The training benchmarks still run: each core function at a tiny size, checking structure and sanity only.

No timing assertions: the figures themselves are the benchmarks' job (benchmarks/results/*.json).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import train_overhead, zero_memory

REPO_ROOT = Path(__file__).resolve().parent.parent


def last_line_pairs(stdout: str) -> dict[str, str]:
    """The benchmark contract: the last printed line is key=value pairs."""
    last = stdout.strip().splitlines()[-1]
    pairs = dict(item.split("=", 1) for item in last.split())
    assert pairs, last
    return pairs


def test_zero_memory_measures_sharded_bytes_against_the_paper():
    args = zero_memory.parse_args(["--hidden", "128", "--layers", "1", "--heads", "4", "--vocab", "512",
                                   "--seq-len", "16", "--micro-batch", "1", "--worlds", "2", "--stages", "0", "3",
                                   "--bucket-elements", "20000"])
    result = zero_memory.compare(zero_memory.measure(args))
    rows = result["rows"]
    assert sorted((r["stage"], r["rank"]) for r in rows) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    for row in rows:
        assert row["psi"] > 0
        assert all(row["measured"][k] > 0 for k in ("params", "grads", "optim_states"))
        assert all(v > 0 for v in row["paper_bytes"].values())
        assert set(row["expected_terms"]) == {"params", "grads", "optim_states", "comm_buffers"}
    stage0 = next(r for r in rows if r["stage"] == 0 and r["rank"] == 0)
    stage3 = next(r for r in rows if r["stage"] == 3 and r["rank"] == 0)
    # Stage 0 holds the whole model on every rank, stage 3 about half of it with 2 ranks.
    assert stage0["measured"]["params"] == pytest.approx(4 * stage0["psi"], rel=0.01)
    assert stage3["measured"]["params"] < 0.7 * stage0["measured"]["params"]
    assert stage3["measured"]["optim_states"] < 0.7 * stage0["measured"]["optim_states"]
    # DeepSpeed's allocations replayed from its rules (benchmarks.zero_memory_model) account for every class;
    # the paper's formulas leave out the bucket-bypassing embedding gradient at stage 3.
    assert result["max_rel_dev"] <= 0.05, [r["rel_dev"] for r in rows]
    assert result["max_paper_rel_dev"] > 0.05
    assert "max dev" in zero_memory.format_table(rows)


def test_mfu_runs_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "mfu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mfu", "--threads", "1", "--matmul-size", "256", "--matmul-trials", "2",
         "--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "512", "--seq-len", "32", "--micro-batch", "2",
         "--steps", "3", "--warmup", "1", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = last_line_pairs(proc.stdout)
    assert {"mfu", "peak_gflops", "achieved_gflops", "tokens_per_s"} <= set(pairs)
    result = json.loads(out.read_text())
    assert result["peak"]["best_gflops"] > 0 and result["train"]["tokens_per_s"] > 0
    assert result["flops_per_token"] == 6 * result["train"]["n_params"] + 12 * 2 * 64 * 32
    assert 0 < result["mfu"] == pytest.approx(float(pairs["mfu"]), abs=1e-4)


def test_train_overhead_bare_side_and_log_parsing(tmp_path):
    args = train_overhead.parse_args([
        "--steps", "4", "--warmup", "1", "--log-every", "1", "--hidden", "64", "--layers", "1", "--seq-len", "32",
        "--micro-batch", "2", "--vocab", "512", "--max-documents", "400", "--workdir", str(tmp_path)])
    assert train_overhead.measured_span(args) == (1, 3)
    config_path, prepared = train_overhead.prepare(args)
    bare = train_overhead.run_bare(args, config_path, prepared, "bare-test")
    assert bare["tokens_per_s"] > 0 and bare["threads_per_process"] == 1 and bare["niceness"] >= 0
    assert bare["tokens_per_step"] == 2 * 2 * 32
    assert bare["tokens_per_cpu_s"] > 0 and bare["worker_cpu_s"] > 0
    assert train_overhead.process_tree_cpu_seconds(os.getpid()) > 0
    assert train_overhead.process_tree_cpu(os.getpid())[os.getpid()][0] == "pytest"  # this run: python -m pytest
    # The census charges each kind of process what it burned between two looks; newcomers from zero.
    spent = train_overhead.cpu_by_label({1: ("raylet", 1.0), 2: ("ray::RayTrainWorker", 5.0)},
                                        {1: ("raylet", 1.5), 2: ("ray::RayTrainWorker", 9.0), 3: ("ray::IDLE", 0.25)})
    assert spent == {"ray::RayTrainWorker": 4.0, "raylet": 0.5, "ray::IDLE": 0.25}
    assert list(spent) == ["ray::RayTrainWorker", "raylet", "ray::IDLE"]

    # A worker log line in Ray Train 2.60's format: the raylm side's clock.
    session = tmp_path / "ray" / "session_x" / "logs" / "train"
    session.mkdir(parents=True)
    lines = [{"message": f"Reporting training result {s}: TrainingReport(checkpoint=None, metrics={{'step': {s}, "
                         f"'loss': 1.0}})", "run_name": "r1", "world_rank": 0, "timestamp_ns": int(s * 2e9)}
             for s in (1, 3)]
    (session / "ray-train-app-worker-abc.log").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
        assert train_overhead.worker_report_times("r1", since=0) == {1: 2.0, 3: 6.0}

    raylm = [{"tokens_per_s": 90.0, "self_reported_tokens_per_s": 95.0, "report_overhead_s_per_report": 0.01,
              "cpu_s_by_process": {"raylet": 0.25, "gcs_server": 0.5}},
             {"tokens_per_s": 90.0, "self_reported_tokens_per_s": 95.0, "report_overhead_s_per_report": 0.01,
              "cpu_s_by_process": {"raylet": 0.75}}]
    summary = train_overhead.summarize(raylm, [{"tokens_per_s": 100.0}] * 2)
    assert summary["ratio"] == pytest.approx(0.9) and summary["pair_ratios"]["values"] == [pytest.approx(0.9)] * 2
    assert summary["raylm_cpu_s_by_process"] == {"raylet": 0.5, "gcs_server": 0.25}  # a run without it counts 0


@pytest.mark.slow
def test_train_overhead_runs_real_pretrain_end_to_end(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_overhead", "--runs", "1", "--steps", "4", "--warmup", "1",
         "--log-every", "1", "--hidden", "64", "--layers", "1", "--seq-len", "32", "--micro-batch", "2",
         "--vocab", "512", "--max-documents", "400", "--workdir", str(tmp_path), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pairs = last_line_pairs(proc.stdout)
    assert float(pairs["ratio"]) > 0
    result = json.loads(out.read_text())
    raylm_run = result["raylm_runs"][0]
    assert raylm_run["timing_source"] == "worker log"
    assert raylm_run["tokens_per_cpu_s"] > 0 and raylm_run["tokens_per_tree_cpu_s"] > 0
    assert result["order"] == ["raylm", "bare"]
