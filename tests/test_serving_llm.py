"""The CPU causal-LM Serve config, deployed with `serve run` on a tiny export: the OpenAI client,
batching, auth, limits, PII masking, multi-LoRA, metrics. One Ray and one deployment for the module."""

import concurrent.futures as futures
import json
import shutil
import time

import httpx
import openai
import pytest
from serving_fixtures import (
    API_KEYS, auth, config_for_test, metric_samples, scrape, serve_run_config, shared_exports, start_ray, stop_ray,
)

from serving.metrics import EXPORTED_NAMES
from serving.tiny_exports import build_lora_adapter

HTTP_PORT = 18011
METRICS_PORT = 18111
BASE = f"http://127.0.0.1:{HTTP_PORT}"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    shared = shared_exports(tmp_path_factory)
    root = tmp_path_factory.mktemp("llm")
    adapters = shutil.copytree(shared["adapters"], root / "adapters")  # this module adds one
    return {"root": root, "base": shared["causal_lm"], "adapters": adapters, "audit": root / "audit.jsonl"}


@pytest.fixture(scope="module")
def server(exports, monkeypatch_module):
    monkeypatch_module.setenv("RAYLM_AUDIT_LOG", str(exports["audit"]))
    context = start_ray(num_cpus=2, metrics_port=METRICS_PORT)
    try:
        config = config_for_test(
            "causal_lm_cpu.yaml",
            http_port=HTTP_PORT,
            app_args={
                "export_dir": str(exports["base"]),
                "adapters_dir": str(exports["adapters"]),
                "torch_threads": 1,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.05,
                "max_tokens_limit": 64,
                "max_prompt_tokens": 100,
                "max_body_bytes": 20_000,
                "pii_masking": True,
                "observers": ["serving.observers:JsonlAuditObserver"],
            },
            deployment_overrides={
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                "ray_actor_options": {"num_cpus": 1},
            },
        )
        serve_run_config(config, exports["root"], context.address_info["gcs_address"])
        yield BASE
    finally:
        stop_ray()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEYS[1], max_retries=0, timeout=60)


def complete(prompt: str, model: str = MODEL, max_tokens: int = 12, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = httpx.post(f"{BASE}/v1/completions", json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_client_completes(client):
    result = client.completions.create(model=MODEL, prompt="The weather today is", max_tokens=8, temperature=0)
    assert result.object == "text_completion" and result.model == MODEL
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens >= 1 and result.usage.prompt_tokens >= 1
    assert result.choices[0].text == complete("The weather today is", max_tokens=8)["choices"][0]["text"]


def test_openai_client_chats_and_streams_the_same_text(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "我的订单什么时候发货？"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Completions stream too, and seeded sampling (temperature > 0) repeats for the same seed.
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0.8, top_p=0.9, seed=11, stream=True))
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0.8, top_p=0.9, seed=11)
    assert text == again.choices[0].text


def test_models_and_openapi_are_published(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, f"{MODEL}:finance", f"{MODEL}:support"]
    schema = httpx.get(f"{BASE}/openapi.json", headers=auth(), timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"):
        assert path in schema["paths"]
    assert {"CompletionRequest", "ChatCompletionRequest", "CompletionResponse"} <= set(schema["components"]["schemas"])


def test_concurrent_batched_greedy_outputs_equal_one_by_one(server):
    prompts = ["The quick brown fox", "Hi", "def f(x): return x * 2 and then call it many times",
               "很好的酒店，服务不错，下次还来", "Order status?", "a", "Our refund policy says that", "年报显示营业收入增长"]
    one_by_one = [complete(p)["choices"][0]["text"] for p in prompts]
    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(lambda p: complete(p)["choices"][0]["text"], prompts))
    assert concurrent == one_by_one
    assert len(set(one_by_one)) > 1  # the prompts really lead to different outputs


def test_healthz_is_open_and_everything_else_needs_a_key(server):
    assert httpx.get(f"{BASE}/healthz", timeout=10).json() == {"status": "ok", "model": MODEL}
    missing = httpx.get(f"{BASE}/v1/models", timeout=10)
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{BASE}/v1/completions", headers=auth("not-a-key"), json={"model": MODEL, "prompt": "x"})
    assert wrong.status_code == 403
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-a-key", max_retries=0).models.list()
    assert httpx.get(f"{BASE}/v1/models", headers=auth(API_KEYS[0]), timeout=10).status_code == 200


def test_limits_answer_400_413_422_with_the_limit_in_the_message(server):
    post = lambda body, **kw: httpx.post(f"{BASE}/v1/completions", headers=auth(), timeout=30, json=body, **kw)  # noqa: E731
    too_many = post({"model": MODEL, "prompt": "hi", "max_tokens": 65})
    assert too_many.status_code == 400 and "limit of 64" in too_many.json()["error"]["message"]
    long_prompt = post({"model": MODEL, "prompt": "word " * 150})
    assert long_prompt.status_code == 400 and "limit of 100" in long_prompt.json()["error"]["message"]
    huge = httpx.post(f"{BASE}/v1/completions", headers=auth(), content=b"{" + b" " * 30_000 + b"}", timeout=30)
    assert huge.status_code == 413 and "20000 bytes" in huge.json()["error"]["message"]
    not_json = httpx.post(f"{BASE}/v1/completions", headers={**auth(), "content-type": "application/json"},
                          content=b"{not json", timeout=30)
    assert not_json.status_code == 422
    bad_field = post({"model": MODEL, "prompt": "hi", "temperature": 5})
    assert bad_field.status_code == 422 and "temperature" in bad_field.json()["error"]["message"]
    typo = post({"model": MODEL, "prompt": "hi", "max_token": 5})
    assert typo.status_code == 422 and "max_token" in typo.json()["error"]["message"]
    unknown = post({"model": "gpt-4", "prompt": "hi"})
    assert unknown.status_code == 404 and "tiny-llama" in unknown.json()["error"]["message"]


def test_pii_is_masked_before_the_model_and_in_audit_logs(server, exports):
    secret = "Customer jane.doe@example.com, 手机13812345678, 身份证11010519491231002X"
    masked_prompt = "Customer [EMAIL], 手机[PHONE], 身份证[CN_ID]"
    assert complete(secret)["choices"][0]["text"] == complete(masked_prompt)["choices"][0]["text"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and masked_prompt not in exports["audit"].read_text(encoding="utf-8"):
        time.sleep(0.2)
    audit = exports["audit"].read_text(encoding="utf-8")
    records = [json.loads(line) for line in audit.splitlines()]
    assert any(r["kind"] == "request" and r["inputs"] == [masked_prompt] for r in records)
    for raw in ("jane.doe@example.com", "13812345678", "11010519491231002X"):
        assert raw not in audit


def test_two_adapters_differ_and_a_new_adapter_is_served_without_restart(server, exports):
    prompt = "Please help me with my account"
    base = complete(prompt)["choices"][0]["text"]
    support = complete(prompt, model=f"{MODEL}:support")["choices"][0]["text"]
    finance = complete(prompt, model=f"{MODEL}:finance")["choices"][0]["text"]
    assert len({base, support, finance}) == 3
    # Mixed-adapter concurrent requests are batched together and still give each adapter's output.
    with futures.ThreadPoolExecutor(6) as pool:
        mixed = list(pool.map(lambda m: complete(prompt, model=m)["choices"][0]["text"],
                              [MODEL, f"{MODEL}:support", f"{MODEL}:finance"] * 2))
    assert mixed == [base, support, finance] * 2

    missing = httpx.post(f"{BASE}/v1/completions", headers=auth(), timeout=30,
                         json={"model": f"{MODEL}:legal", "prompt": prompt})
    assert missing.status_code == 404
    build_lora_adapter(exports["base"], exports["adapters"] / "legal", seed=3)  # as a training run would
    models = httpx.get(f"{BASE}/v1/models", headers=auth(), timeout=10).json()
    assert f"{MODEL}:legal" in [m["id"] for m in models["data"]]
    legal = complete(prompt, model=f"{MODEL}:legal")["choices"][0]["text"]
    assert legal not in {base, support, finance}


def test_custom_metrics_appear_next_to_ray_serve_metrics(server):
    prompts = [f"Metric probe {i}" for i in range(6)]
    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda p: complete(p, max_tokens=4), prompts))
    def batched_more_than_one(text: str) -> bool:
        singles = sum(v for labels, v in metric_samples(text, "ray_raylm_batch_size_bucket") if 'le="1.0"' in labels)
        return sum(v for _, v in metric_samples(text, "ray_raylm_batch_size_count")) > singles

    deadline = time.monotonic() + 30
    while True:  # replicas push metrics every second (RAY_metrics_report_interval_ms in the fixture)
        text = scrape(METRICS_PORT)
        missing = [n for n in EXPORTED_NAMES if not metric_samples(text, n)]
        if (not missing and batched_more_than_one(text)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"not on the metrics port: {missing}"
    assert batched_more_than_one(text), "no batch held more than one request"
    assert any(line.startswith("ray_serve_") for line in text.splitlines())
    requests = metric_samples(text, "ray_raylm_requests_total")
    assert any('route="/v1/completions"' in labels and 'status="200"' in labels and value > 0 for labels, value in requests)
    assert any('status="401"' in labels for labels, _ in requests)
    assert all('application="causal-lm"' in labels and 'replica="' in labels for labels, _ in requests)
