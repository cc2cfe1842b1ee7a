"""Stage 3 and 4: the Serve app the demo starts, and the requests it sends through the openai client.

The app is the shipped Serve config (serving/configs/causal_lm_cpu.yaml) with its args pointed at the
base export and the sweep's adapters directory, a fresh API key (a 0600 file the replicas read), a free
port on 127.0.0.1 and autoscaling bounds from the demo config; it is deployed with Serve's own CLI
(`serve run --non-blocking`) and stays up on the demo's Ray node after the demo returns.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from demo.config import Plan
from demo.sentiment_data import label_of, messages


@dataclass
class Endpoint:
    url: str  # http://127.0.0.1:<port>/v1
    api_key_file: Path
    base_model: str  # model id of the base
    tuned_model: str  # model id of the fine-tuned adapter: "<base>:<adapter>"
    serve_config: Path
    app: str

    @property
    def api_key(self) -> str:
        return self.api_key_file.read_text(encoding="utf-8").strip()


def write_serve_config(demo_plan: Plan, out_dir: Path, export_dir: str, adapters_dir: str, http_port: int,
                       api_key_file: Path) -> Path:
    """The shipped Serve config, pointed at this demo's model, adapters, key and port."""
    config = yaml.safe_load(demo_plan.serve_config.read_text(encoding="utf-8"))
    config["http_options"].update(host="127.0.0.1", port=http_port)
    (app,) = config["applications"]
    app["args"].update(export_dir=export_dir, adapters_dir=adapters_dir, api_keys_file=str(api_key_file),
                       api_keys_env=None, require_api_key=True)
    for deployment in app.get("deployments", []):
        scaling = deployment.setdefault("autoscaling_config", {})
        scaling.update(min_replicas=demo_plan.cfg.serve.min_replicas, max_replicas=demo_plan.cfg.serve.max_replicas)
    path = out_dir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def new_api_key(out_dir: Path) -> Path:
    """A random key in a file only this user reads (the replicas read it: api_keys_file)."""
    path = out_dir / "api_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(24) + "\n")
    return path


def deploy(demo_plan: Plan, gcs_address: str, base: dict, adapters_dir: str, http_port: int, out_dir: Path,
           timeout_s: float = 600) -> Endpoint:
    """Deploy the app with `serve run --non-blocking` and wait until it answers its health check."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file = new_api_key(out_dir)
    config_path = write_serve_config(demo_plan, out_dir, base["export_dir"], adapters_dir, http_port, key_file)
    result = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", "--address",
                             gcs_address, str(config_path)], capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"serve run {config_path} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    app = yaml.safe_load(config_path.read_text(encoding="utf-8"))["applications"][0]["name"]
    wait_running(app, timeout_s)
    wait_healthy(f"http://127.0.0.1:{http_port}/healthz", timeout_s)
    name = base["model_name"]
    return Endpoint(url=f"http://127.0.0.1:{http_port}/v1", api_key_file=key_file, base_model=name,
                    tuned_model=f"{name}:{demo_plan.cfg.sweep.adapter_name}", serve_config=config_path, app=app)


def wait_running(app: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {app} failed to deploy: {status.message}")
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(1)
    raise TimeoutError(f"Serve app {app} not RUNNING after {timeout_s:.0f} s")


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


# --------------------------------------------------------------------------------------------
# Stage 4: requests


def client(endpoint: Endpoint):
    from openai import OpenAI

    return OpenAI(base_url=endpoint.url, api_key=endpoint.api_key, max_retries=2, timeout=120)


def ask(openai_client, model: str, review: str, max_tokens: int) -> tuple[str, float]:
    """One chat request (greedy); returns the answer and its latency in seconds."""
    started = time.perf_counter()
    reply = openai_client.chat.completions.create(model=model, messages=messages(review),
                                                  max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content or "", time.perf_counter() - started


def ask_all(openai_client, model: str, held_out: list[dict], max_tokens: int, concurrency: int) -> dict:
    """Every held-out review, `concurrency` at a time: answers, accuracy, answers naming no label, latencies, requests/s."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda row: ask(openai_client, model, row["review"], max_tokens), held_out))
    wall = time.perf_counter() - started
    answers = [answer for answer, _ in replies]
    given = [label_of(answer) for answer in answers]
    correct = sum(label == row["label"] for label, row in zip(given, held_out))
    return {"model": model, "answers": answers, "latencies_s": [lat for _, lat in replies],
            "accuracy": correct / len(held_out), "no_label": given.count(None), "requests": len(held_out), "wall_s": wall,
            "requests_per_s": len(held_out) / wall}


def stream(openai_client, model: str, review: str, max_tokens: int, out=sys.stdout) -> tuple[str, float]:
    """One streamed chat answer, printed as its chunks arrive; returns the text and time to first token."""
    started = time.perf_counter()
    first = None
    pieces = []
    chunks = openai_client.chat.completions.create(model=model, messages=messages(review),
                                                   max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in chunks:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first if first is not None else time.perf_counter() - started
            pieces.append(delta)
            out.write(delta)
            out.flush()
    out.write("\n")
    return "".join(pieces), first or 0.0
