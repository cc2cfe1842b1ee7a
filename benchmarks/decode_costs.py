"""What a request costs the model thread, alone and in a batch of 32: the bound on serve_load's batch_speedup.

    python -m benchmarks.decode_costs [--threads 1] [--max-tokens 16]

On serve_load's tiny model and prompts, in this process, no HTTP, timed in CPU seconds of this thread
(so a busy machine inflates the figures less than wall clock would): each prompt prefilled and decoded
alone, then the prompts in batches of 32 (joined together, grouped by length as the server does, decoded
until every row is done). A request's cost is its prefill plus its share of the decode steps.
`bound` = alone / batched: the batching speedup the model thread allows before any per-request work
around the model, which both sides of serve_load pay and which lowers the ratio further;
`bound_free_decode` = the same if decode steps cost nothing. Last line `key=value`.
"""

from __future__ import annotations

import argparse
import statistics
import time


def request_costs(engine, prompt_ids: list[list[int]], max_tokens: int, batch: int = 32) -> dict[str, float]:
    """Model-thread CPU ms per request: prefill and decode, alone and in batches of `batch`."""
    from serving.generation import GenerationJob, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def run(group: list[list[int]]) -> tuple[float, list[float]]:
        decode_batch = engine.start_batch()
        started = time.thread_time()
        decode_batch.join([GenerationJob(list(ids), params) for ids in group])
        prefill = time.thread_time() - started
        steps = []
        while not decode_batch.done:
            started = time.thread_time()
            decode_batch.decode()
            steps.append(time.thread_time() - started)
        return prefill, steps

    run(prompt_ids[:batch])  # warm-up
    alone = [run([ids]) for ids in prompt_ids]
    groups = [prompt_ids[i:i + batch] for i in range(0, len(prompt_ids) - batch + 1, batch)]
    batched = [run(group) for group in groups]
    requests = batch * len(groups)
    alone_prefill = statistics.mean(p for p, _ in alone)
    alone_step = statistics.median(s for _, steps in alone for s in steps)
    batched_prefill = sum(p for p, _ in batched) / requests
    batched_decode = sum(sum(steps) for _, steps in batched) / requests
    alone_request = alone_prefill + (max_tokens - 1) * alone_step  # the prefill picks the first token
    ms = 1000.0
    return {
        "prompts": len(prompt_ids),
        "prompt_tokens_mean": statistics.mean(len(ids) for ids in prompt_ids),
        "alone_prefill_ms": alone_prefill * ms,
        "alone_decode_step_ms": alone_step * ms,
        "alone_request_ms": alone_request * ms,
        f"batch{batch}_prefill_ms_per_request": batched_prefill * ms,
        f"batch{batch}_decode_ms_per_row_step": batched_decode / (max_tokens - 1) * ms,
        f"batch{batch}_request_ms": (batched_prefill + batched_decode) * ms,
        "bound": alone_request / (batched_prefill + batched_decode),
        "bound_free_decode": alone_request / batched_prefill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    import tempfile
    from pathlib import Path

    import torch

    from benchmarks.serve_load import prompts, small_export
    from serving.export_format import read_export
    from serving.generation import CausalLMEngine

    torch.set_num_threads(args.threads)
    export_dir = small_export(Path(tempfile.mkdtemp(prefix="raylm-decode-costs-")))
    engine = CausalLMEngine(read_export(export_dir))
    costs = request_costs(engine, [engine.encode(text) for text in prompts()], args.max_tokens)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
