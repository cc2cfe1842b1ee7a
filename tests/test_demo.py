"""`make demo` (python -m demo.main): its config checks, and the whole pipeline at tiny sizes.

The end-to-end test runs exactly what `make demo` runs, `demo.main.main`, on the shipped demo config
with tiny sizes set on top (a tiny Llama export as the fine-tuned base instead of SmolLM2, a few steps,
2 trials): a real Ray node of its own, real Ray Train + DeepSpeed, a real Tune sweep, a real Serve app
over HTTP on 127.0.0.1, the real openai client. Then it reruns the demo (cached stages, a new endpoint).
"""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demo import main as demo_main
from demo.config import load_demo
from demo.sentiment_data import build_task_data, label_of, messages
from training.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "demo_cpu.yaml"


def test_full_demo_config_and_its_stage_configs_validate(capsys):
    assert demo_main.main(["--config", str(DEMO_CONFIG), "--validate-only"]) == 0
    assert "valid" in capsys.readouterr().out
    plan = load_demo(DEMO_CONFIG)
    assert plan.pretrain_config.name == "demo_cpu.yaml" and plan.sweep_config.is_file() and plan.serve_config.is_file()


def test_bad_demo_keys_and_bad_stage_overrides_are_reported_with_key_and_stage(capsys):
    base = ["--config", str(DEMO_CONFIG), "--validate-only"]
    assert demo_main.main(base + ["--set", "serve.max_replicaz=3", "--set", "ray_cpus=1"]) == 2
    err = capsys.readouterr().err
    assert "serve.max_replicaz: unknown key. Did you mean 'max_replicas'?" in err and "ray_cpus" in err
    # The stage configs are validated as the demo runs them, all problems at once, each under its stage.
    argv = base + ["--set", 'pretrain.set={"optim.lrr": 1}', "--set", 'sweep.set_base={"method.lora.r": 0}']
    assert demo_main.main(argv) == 2
    err = capsys.readouterr().err
    assert "pretrain (../pretrain/demo_cpu.yaml): optim.lrr: unknown key" in err
    assert "sweep (../tune/demo_sentiment_lora_asha_cpu.yaml): base.method.lora.r" in err


def test_a_sweep_that_is_not_a_lora_sft_fine_tune_is_refused():
    with pytest.raises(ConfigError, match="must sweep a LoRA sft fine-tune"):
        load_demo(DEMO_CONFIG, ["sweep.config=../tune/tiny_asha_cpu.yaml"])


def test_task_data_is_balanced_keeps_held_out_reviews_out_of_training_and_reads_labels_from_answers(tmp_path):
    counts = build_task_data(tmp_path, train_examples=40, held_out=10, min_chars=6, max_chars=30, seed=3)
    assert counts["train_rows"] == 40 and counts["held_out_rows"] == 10
    train = [json.loads(line) for line in (tmp_path / "sentiment_train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "sentiment_held_out.jsonl").read_text().splitlines()]
    answers = [row["messages"][-1]["content"] for row in train]
    assert answers.count("positive") == answers.count("negative") == 20
    assert sorted(row["label"] for row in held) == ["negative"] * 5 + ["positive"] * 5
    # Training rows ask exactly what the demo's requests ask (the messages of one review plus the answer).
    reviews = [row["messages"][1]["content"].split("\n", 1)[0].removeprefix("Review: ") for row in train]
    assert all(row["messages"][:-1] == messages(review) for row, review in zip(train, reviews))
    assert not {row["review"] for row in held} & set(reviews)
    assert [label_of(a) for a in ("positive", "Negative.", "The review is positive", "positive or negative", "好")] == \
        ["positive", "negative", "positive", None, None]


def tiny_overrides(workdir: Path, base_export: Path) -> list[str]:
    """The shipped demo at test sizes: every stage runs, each for seconds."""
    sets = {
        "workdir": str(workdir),
        "pretrain.set": {"run.name": "demo-pretrain", "model.hidden_size": 64, "model.num_layers": 2,
                         "model.num_heads": 4, "model.max_position_embeddings": 64, "tokenizer.vocab_size": 512,
                         "data.seq_len": 32, "data.max_documents": 800, "optim.max_steps": 4, "optim.warmup_steps": 1,
                         "optim.micro_batch_size": 4, "optim.grad_accum_steps": 1, "run.eval_every_steps": 2,
                         "run.checkpoint_every_steps": 2, "run.eval_batches": 2, "run.log_every_steps": 2},
        "base_model": {"source": "raylm_export", "path": str(base_export), "name": "tiny-llama"},
        "task_data": {"train_examples": 48, "held_out": 4, "min_chars": 4, "max_chars": 12},
        # Both trials at once, one Train worker each: the sweep's cost is mostly each worker's start (imports).
        "sweep.set": {"space": {"optim.lr": "grid([1.0e-2, 1.0e-4])"}, "max_concurrent_trials": 2,
                      "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}},
        "sweep.set_base": {"optim.max_steps": 4, "optim.warmup_steps": 1, "data.max_len": 160, "scaling.num_workers": 1,
                           "run.eval_every_steps": 2, "run.checkpoint_every_steps": 2, "run.eval_batches": 2,
                           "run.log_every_steps": 2},
        "serve.max_replicas": 1,
        "requests": {"show": 2, "concurrency": 2, "max_tokens": 4, "stream_max_tokens": 4},
    }
    return [f"{key}={json.dumps(value)}" for key, value in sets.items()]


def test_the_tiny_sizes_of_the_end_to_end_tests_validate(tmp_path):
    plan = load_demo(DEMO_CONFIG, tiny_overrides(tmp_path / "demo", tmp_path / "tiny-llama"))
    assert plan.cfg.task_data.train_examples == 48 and plan.workdir == (tmp_path / "demo").resolve()


def run_demo(workdir: Path, base_export: Path) -> tuple[dict, str, str]:
    """`python -m demo.main` in its own process, as `make demo` runs it (Ray reads its auth mode at import)."""
    argv = [sys.executable, "-m", "demo.main", "--config", str(DEMO_CONFIG)]
    for item in tiny_overrides(workdir, base_export):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(*[line for line in result.stdout.splitlines() if line.startswith(("stage times", "sentiment, "))], sep="\n")
    endpoint_dir = sorted((workdir / "endpoints").iterdir())[-1]
    return json.loads((endpoint_dir / "summary.json").read_text(encoding="utf-8")), result.stdout, result.stderr


def check_console(console: str, workdir: Path) -> None:
    """The demo's console: raylm's lines, no Ray chatter; one line says where Ray's lines went, and they are there."""
    assert "[raylm] step 4/4 | loss" in console and "[raylm-tune] trial " in console
    for chatter in ("Reporting training result", "Running Dataset", "Configuration for experiment", "(raylet)",
                    "raylm-worker rank=", "Connecting to existing Ray cluster", "Wrote the latest version"):
        assert chatter not in console, chatter
    (where,) = [line for line in console.splitlines() if line.startswith("[demo] logs: ")]
    driver_log = Path(where.split()[2])
    assert driver_log.parent.parent == (workdir / "logs").resolve() and driver_log.name == "driver.log"
    assert (driver_log.parent / "ray_logs").is_symlink() and (driver_log.parent / "ray_logs").is_dir()
    log = driver_log.read_text(encoding="utf-8")
    # What the console left out: Ray's own lines on the driver and the Train workers' forwarded output.
    assert "Connecting to existing Ray cluster" in log and "raylm-worker rank=0" in log, log[-3000:]
    # Each stage's run and sweep directory has its part of it, and the link to every Ray process's log.
    run_dir = next((workdir / "runs").glob("demo-pretrain-*"))
    sweep_dir = next((workdir / "sweeps").glob("*"))
    for where in (run_dir, sweep_dir):
        assert (where / "driver.log").is_file() and (where / "ray_logs").is_symlink()
    assert "raylm-worker rank=1" in (run_dir / "driver.log").read_text(encoding="utf-8")


def stop(summary: dict) -> None:
    from cluster.local import LocalCluster

    node_dir = Path(summary["artifacts"]["Ray node (logs)"])
    cluster = LocalCluster(directory=node_dir, base_port=int(node_dir.name.rsplit("-", 1)[1]))
    cluster.down()
    assert cluster.running_node_count() == 0


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_serves_the_adapter_and_reruns_from_cache(tmp_path):
    import httpx
    import openai

    from serving.export_format import read_adapter
    from serving.tiny_exports import build_causal_lm_export

    base = build_causal_lm_export(tmp_path / "tiny-llama", hidden_size=64, num_layers=2, vocab_size=512,
                                  max_seq_len=256, initializer_range=0.02)
    workdir = tmp_path / "demo"
    summary, out, err = run_demo(workdir, base)
    try:
        for number in range(1, 6):
            assert f"=== [{number}/5]" in out
        check_console(out + err, workdir)
        figures, artifacts = summary["figures"], summary["artifacts"]
        # 1: the pretraining run with its results and loss curve
        assert figures["pretrain"]["steps"] == 4 and figures["pretrain"]["val_perplexity"] > 1
        assert (Path(artifacts["pretraining run"]) / "results.json").is_file()
        # 2: two trials, the best adapter published where the app serves it
        assert figures["sweep"]["trials"] == 2 and figures["sweep"]["best"] <= figures["sweep"]["worst"]
        assert read_adapter(artifacts["best adapter"]).manifest.base_model == "tiny-llama"
        # 3: the Serve config as deployed: 127.0.0.1, autoscaling, API key from a 0600 file
        serve_config = yaml.safe_load(Path(artifacts["serve config"]).read_text())
        assert serve_config["http_options"]["host"] == "127.0.0.1"
        (app,) = serve_config["applications"]
        assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 1
        key_file = Path(artifacts["API key (0600)"])
        assert app["args"]["api_keys_file"] == str(key_file) and app["args"]["require_api_key"]
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        # 4: answers from both models; the endpoint still answers the adapter after the demo returned
        assert set(figures["serving"]) == {"base", "fine-tuned"}
        assert all(run["requests"] == 4 and run["requests_per_s"] > 0 for run in figures["serving"].values())
        assert "sentiment, before fine-tuning (tiny-llama)" in out and "sentiment, after fine-tuning" in out
        curl = summary["commands"][0]
        url = curl.split()[2].rsplit("/chat/completions", 1)[0]
        client = openai.OpenAI(base_url=url, api_key=key_file.read_text().strip())
        reply = client.chat.completions.create(model="tiny-llama:sentiment", max_tokens=4, temperature=0,
                                               messages=messages("很好"))
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
        # The printed curl command is one a shell reads back whole: its JSON body (the prompt holds an
        # apostrophe) parses and, sent with the key as the command sends it, gets an answer.
        words = shlex.split(curl)
        assert words[:3] == ["curl", "-s", f"{url}/chat/completions"]
        assert words[4] == f"Authorization: Bearer $(cat {key_file})"
        body = json.loads(words[words.index("-d") + 1])
        assert body["model"] == "tiny-llama:sentiment" and "review's" in body["messages"][0]["content"]
        answered = httpx.post(f"{url}/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key_file.read_text().strip()}"})
        assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"], answered.text
        with pytest.raises(openai.PermissionDeniedError):  # a wrong key is a 403 (docs/serving.md; none is a 401)
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        # 5: one PNG, the commands to try and to stop
        assert Path(artifacts["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "cluster.local --dir" in summary["commands"][1]

        # A rerun reuses the pretraining and the sweep, and starts a new endpoint beside the first.
        again, out, _ = run_demo(workdir, base)
        try:
            assert "reusing pretraining run" in out and "reusing sweep" in out
            assert again["artifacts"]["best adapter"] == artifacts["best adapter"]
            assert again["commands"][0].split()[2] != curl.split()[2]
        finally:
            stop(again)
    finally:
        stop(summary)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_ctrl_c_during_pretraining_stops_every_process_of_the_demos_node(tmp_path):
    import signal
    import threading
    import time

    from cluster.local import LocalCluster
    from cluster.local_state import session_members

    argv = [sys.executable, "-m", "demo.main", "--config", str(DEMO_CONFIG)]
    for item in tiny_overrides(tmp_path / "demo", tmp_path / "unused"):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; a test run started in the background
    # by a non-interactive shell inherits SIGINT ignored, and so would the demo (it would never see the signal).
    # Its own session: the signal below is the only one it gets, and only it gets it.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    node_dir = session = None
    try:
        deadline = time.monotonic() + 300
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            up = [line for line in list(lines) if line.startswith("[demo] Ray node up at")]
            if up and node_dir is None:
                node_dir = Path(up[0].split("its directory ", 1)[1].split(" ", 1)[0])
                session = json.loads((node_dir / "cluster.json").read_text())["nodes"]["head"]["pid"]
            if session is not None:  # pretraining is inside fit() once its Train workers run on the node
                workers = [pid for pid in session_members(session) if "RayTrainWorker" in _cmdline(pid)]
                if workers:
                    break
            time.sleep(0.5)
        assert workers and "=== [1/5]" in "".join(lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        out = "".join(lines)
        assert proc.returncode == 130, out
        assert "[raylm] interrupted: checkpoints kept in" in out  # the pretraining run saw the Ctrl-C ...
        assert "interrupted: stopping the demo's Ray node" in out  # ... and the demo stopped its node
        assert session_members(session) == []  # every process of the node, the Train workers included
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:  # a failed check leaves neither the demo nor its node running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if node_dir is not None and (node_dir / "cluster.json").is_file():
            LocalCluster(directory=node_dir, base_port=int(node_dir.name.rsplit("-", 1)[1])).down()
