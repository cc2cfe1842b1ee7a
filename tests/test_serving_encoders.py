"""The CPU classification and NER Serve configs, deployed together with `serve run` on tiny exports."""

import concurrent.futures as futures

import httpx
import pytest
from serving_fixtures import auth, config_for_test, serve_run_config, shared_exports, start_ray, stop_ray

from serving.tiny_exports import NER_LABELS, SENTIMENT_LABELS

HTTP_PORT = 18021
METRICS_PORT = 18121
BASE = f"http://127.0.0.1:{HTTP_PORT}"
TEXTS = ["The service was quick and the staff friendly.", "很好的酒店，服务不错，下次还来",
         "Revenue fell 20% and the outlook is weak.", "ok", "张三在北京的阿里巴巴工作。", "Wire money to account 42 today"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = shared_exports(tmp_path_factory)
    context = start_ray(num_cpus=2, metrics_port=METRICS_PORT)
    try:
        common = {"torch_threads": 1, "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_prompt_tokens": 64,
                  "max_inputs_per_request": 8}
        small = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.5}}
        classify = config_for_test("classification_cpu.yaml", http_port=HTTP_PORT, route_prefix="/sentiment",
                                   app_args={"export_dir": str(exports["classifier"]), **common},
                                   deployment_overrides=small)
        ner = config_for_test("ner_cpu.yaml", http_port=HTTP_PORT, route_prefix="/ner",
                              app_args={"export_dir": str(exports["ner"]), **common}, deployment_overrides=small)
        # `serve run` of one config declares the whole set of apps: both go in one file.
        classify["applications"] += ner["applications"]
        serve_run_config(classify, tmp_path_factory.mktemp("encoders"), context.address_info["gcs_address"])
        yield BASE
    finally:
        stop_ray()


def post(path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{BASE}{path}", json=body, headers=kwargs.pop("headers", auth()), timeout=60, **kwargs)


def test_classify_returns_labels_and_probabilities(server):
    response = post("/sentiment/v1/classify", {"input": TEXTS[:3]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-bert-sequence-classification"
    assert len(body["results"]) == 3 and body["usage"]["prompt_tokens"] > 3
    for result in body["results"]:
        assert list(result["probabilities"]) == SENTIMENT_LABELS
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert result["score"] == result["probabilities"][result["label"]]


def test_concurrent_batched_classification_equals_one_by_one(server):
    alone = [post("/sentiment/v1/classify", {"input": t}).json()["results"][0]["probabilities"] for t in TEXTS]
    with futures.ThreadPoolExecutor(len(TEXTS)) as pool:
        together = list(pool.map(lambda t: post("/sentiment/v1/classify", {"input": t}).json()["results"][0]["probabilities"], TEXTS))
    for a, b in zip(alone, together):
        assert list(a) == list(b)
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    assert len({max(p, key=p.get) for p in alone} | {round(max(p.values()), 4) for p in alone}) > 1


def test_ner_returns_entities_with_character_offsets(server):
    response = post("/ner/v1/ner", {"input": TEXTS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(TEXTS)
    types = {label.split("-", 1)[1] for label in NER_LABELS if label != "O"}
    spans = [(text, e) for text, r in zip(TEXTS, results) for e in r["entities"]]
    assert spans, "a random 7-label tagger tags some tokens as entities"
    for text, entity in spans:
        assert entity["entity"] in types
        assert 0 <= entity["start"] < entity["end"] <= len(text)
        assert text[entity["start"]:entity["end"]] == entity["text"]
    # Batching does not change the entities.
    with futures.ThreadPoolExecutor(len(TEXTS)) as pool:
        alone = list(pool.map(lambda t: post("/ner/v1/ner", {"input": t}).json()["results"][0], TEXTS))
    assert [[(e["entity"], e["start"], e["end"]) for e in r["entities"]] for r in alone] == \
        [[(e["entity"], e["start"], e["end"]) for e in r["entities"]] for r in results]


def test_encoder_endpoints_check_keys_limits_and_task(server):
    assert httpx.get(f"{BASE}/ner/healthz", timeout=10).status_code == 200
    assert post("/ner/v1/ner", {"input": "x"}, headers={}).status_code == 401
    assert post("/ner/v1/ner", {"input": "x"}, headers=auth("bad")).status_code == 403
    wrong_task = post("/ner/v1/classify", {"input": "x"})
    assert wrong_task.status_code == 404 and "/v1/ner" in wrong_task.json()["error"]["message"]
    too_many = post("/sentiment/v1/classify", {"input": ["a"] * 9})
    assert too_many.status_code == 400 and "limit of 8" in too_many.json()["error"]["message"]
    too_long = post("/sentiment/v1/classify", {"input": "word " * 100})
    assert too_long.status_code == 400 and "limit of 64" in too_long.json()["error"]["message"]
    assert post("/sentiment/v1/classify", {"inputs": "typo"}).status_code == 422
    schema = httpx.get(f"{BASE}/sentiment/openapi.json", headers=auth(), timeout=10).json()
    assert {"ClassifyRequest", "ClassifyResponse", "NerResponse"} <= set(schema["components"]["schemas"])
