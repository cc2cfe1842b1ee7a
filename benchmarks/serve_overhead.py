"""Serve round-trip overhead: a 1-token completion over HTTP through Ray Serve vs the same call in-process.

overhead_ms = p50(HTTP via Serve) - p50(direct engine call), for a deployment with batching off
(max_batch_size 1), i.e. proxy + replica hop + FastAPI + auth + JSON. With batching on, a lone request
also waits up to batch_wait_timeout_s for company; that figure is printed as overhead_batched_ms.

    python -m benchmarks.serve_overhead [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HTTP_PORT = 18041
API_KEY = "bench-key"


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batch-wait-s", type=float, default=0.005)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAYLM_API_KEYS"] = API_KEY
    import httpx
    import ray
    import torch
    from ray import serve

    from serving.app import CausalLMServer
    from serving.args import ServingArgs
    from serving.export_format import read_export
    from serving.generation import CausalLMEngine, GenerationJob, SamplingParams
    from serving.tiny_exports import build_causal_lm_export

    workdir = Path(tempfile.mkdtemp(prefix="raylm-overhead-"))
    export_dir = build_causal_lm_export(workdir / "export")
    prompt = "How do I reset my password?"

    torch.set_num_threads(1)
    engine = CausalLMEngine(read_export(export_dir))
    one_token = SamplingParams(max_tokens=1, temperature=0.0)
    direct = []
    for i in range(args.requests + 20):
        started = time.perf_counter()
        engine.generate([GenerationJob(engine.encode(prompt), one_token)])
        if i >= 20:
            direct.append(time.perf_counter() - started)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        figures = {"direct_p50_ms": p50_ms(direct)}
        for label, batch_size in (("unbatched", 1), ("batched", 8)):
            serving_args = ServingArgs(export_dir=str(export_dir), torch_threads=1, max_batch_size=batch_size,
                                       batch_wait_timeout_s=args.batch_wait_s).model_dump()
            serve.run(CausalLMServer.options(num_replicas=1).bind(serving_args), name=label, route_prefix=f"/{label}")
            body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            samples = []
            with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}/{label}",
                              headers={"Authorization": f"Bearer {API_KEY}"}) as client:
                for i in range(args.requests + 20):
                    started = time.perf_counter()
                    response = client.post("/v1/completions", json=body)
                    elapsed = time.perf_counter() - started
                    assert response.status_code == 200, response.text
                    if i >= 20:
                        samples.append(elapsed)
            figures[f"serve_{label}_p50_ms"] = p50_ms(samples)
            figures[f"serve_{label}_p99_ms"] = sorted(samples)[int(0.99 * len(samples))] * 1000
            serve.delete(label)
    finally:
        serve.shutdown()
        ray.shutdown()
    overhead = figures["serve_unbatched_p50_ms"] - figures["direct_p50_ms"]
    overhead_batched = figures["serve_batched_p50_ms"] - figures["direct_p50_ms"]
    print(f"direct engine call, 1 token: p50 {figures['direct_p50_ms']:.2f} ms")
    print(f"HTTP via Serve, batching off: p50 {figures['serve_unbatched_p50_ms']:.2f} ms "
          f"(p99 {figures['serve_unbatched_p99_ms']:.2f})")
    print(f"HTTP via Serve, batching on (wait {args.batch_wait_s * 1000:.0f} ms): p50 "
          f"{figures['serve_batched_p50_ms']:.2f} ms (p99 {figures['serve_batched_p99_ms']:.2f})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_overhead.json").write_text(json.dumps(
        {**figures, "overhead_ms": overhead, "overhead_batched_ms": overhead_batched, "requests": args.requests,
         "target": {"overhead_ms": 3.0}}, indent=2))
    print(f"overhead_ms={overhead:.2f} overhead_batched_ms={overhead_batched:.2f} direct_p50_ms={figures['direct_p50_ms']:.2f}")


if __name__ == "__main__":
    main()
