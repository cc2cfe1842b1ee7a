"""benchmarks.decode_costs on the tiny causal-LM export: a request's model-thread cost split into prefill and
decode, alone and batched, and the bound on serve_load's batch_speedup taken from them."""

import pytest
from serving_fixtures import shared_exports


def test_decode_costs_split_requests_into_prefill_and_decode_alone_and_batched(tmp_path_factory):
    from benchmarks.decode_costs import request_costs
    from serving.export_format import read_export
    from serving.generation import CausalLMEngine

    engine = CausalLMEngine(read_export(shared_exports(tmp_path_factory)["causal_lm"]))
    texts = ["alpha beta gamma", "one two", "the quick brown fox jumps over the lazy dog", "hi"]
    costs = request_costs(engine, [engine.encode(t) for t in texts], max_tokens=6, batch=2)

    assert costs["prompts"] == 4
    assert costs["prompt_tokens_mean"] == pytest.approx(sum(len(engine.encode(t)) for t in texts) / 4)
    parts = ("alone_prefill_ms", "alone_decode_step_ms", "batch2_prefill_ms_per_request", "batch2_decode_ms_per_row_step")
    assert all(costs[key] > 0 for key in parts)
    # A request is its prefill (which picks the first token) plus five decode steps.
    assert costs["alone_request_ms"] == pytest.approx(costs["alone_prefill_ms"] + 5 * costs["alone_decode_step_ms"])
    assert costs["batch2_request_ms"] == pytest.approx(
        costs["batch2_prefill_ms_per_request"] + 5 * costs["batch2_decode_ms_per_row_step"])
    assert costs["bound"] == pytest.approx(costs["alone_request_ms"] / costs["batch2_request_ms"])
    assert costs["bound_free_decode"] > costs["bound"]
