"""The CPU classification and NER Serve configs, deployed together with `serve run` on tiny exports."""

import concurrent.futures as futures

import httpx
import pytest
from serving_fixtures import (
    Raw, auth, check_error_table, config_for_test, raw_body_rows, serve_run_config, shared_exports, start_ray, stop_ray,
)

from serving.tiny_exports import NER_LABELS, SENTIMENT_LABELS

HTTP_PORT = 18021
METRICS_PORT = 18121
BASE = f"http://127.0.0.1:{HTTP_PORT}"
TEXTS = ["The service was quick and the staff friendly.", "很好的酒店，服务不错，下次还来",
         "Revenue fell 20% and the outlook is weak.", "ok", "张三在北京的阿里巴巴工作。", "Wire money to account 42 today"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exports = shared_exports(tmp_path_factory)
    context = start_ray(num_cpus=2, metrics_port=METRICS_PORT, quick_replica_stop=True)  # stopped only at the end
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


# ---- no input gets a 500 (issue 11 item 2) -----------------------------------------------------------
def _encoder_rows(model: str) -> list[tuple]:
    return raw_body_rows(None) + [
        ("no input", {}, 422, "input: field required"),
        ("input null", {"input": None}, 422, "input"),
        ("input number", {"input": 5}, 422, "input"),
        ("input negative", {"input": -1}, 422, "input"),
        ("input 2**70", {"input": 2**70}, 422, "input"),
        ("input float", {"input": 1.5}, 422, "input"),
        ("input bool", {"input": True}, 422, "input"),
        ("input NaN", {"input": float("nan")}, 422, "input"),
        ("input Infinity", {"input": float("inf")}, 422, "input"),
        ("input empty list", {"input": []}, 400, "input is empty"),
        ("input list of empty list", {"input": [[]]}, 422, "input"),
        ("input nested list", {"input": [["a"]]}, 422, "input"),
        ("input token ids", {"input": [1, 2]}, 422, "input"),
        ("input object", {"input": {"text": "x"}}, 422, "input"),
        ("input nested object", {"input": {"a": [1]}}, 422, "input"),
        ("input mixed list", {"input": ["a", 5]}, 422, "input"),
        ("input list with null", {"input": [None]}, 422, "input"),
        ("input content parts", {"input": [{"type": "text", "text": "x"}]}, 422, "input"),
        ("lone surrogate in list", Raw(b'{"input": ["ok", "\\udc00"]}'), 422, "surrogate"),
        ("9 texts", {"input": ["a"] * 9}, 400, "limit of 8"),
        ("65 texts", {"input": ["a"] * 65}, 400, "limit of 8"),
        ("text too long", {"input": "word " * 100}, 400, "limit of 64"),
        ("one of two too long", {"input": ["ok", "word " * 100]}, 400, "limit of 64"),
        ("control chars and words too long", {"input": "\x00\x1b word " * 100}, 400, "limit of 64"),
        ("model unknown", {"input": "x", "model": "nope"}, 404, "is not served here"),
        ("model empty", {"input": "x", "model": ""}, 404, "is not served here"),
        ("model 5000 chars", {"input": "x", "model": "m" * 5000}, 404, "5000 chars"),
        ("model control chars", {"input": "x", "model": model + "\x00"}, 404, "is not served here"),
        ("model number", {"input": "x", "model": 5}, 422, "model"),
        ("model list", {"input": "x", "model": [model]}, 422, "model"),
        ("field typo inputs", {"inputs": "x"}, 422, "inputs"),
        ("field typo Input", {"Input": "x"}, 422, "Input"),
        ("field texts", {"input": "x", "texts": ["y"]}, 422, "texts"),
        ("field top_k", {"input": "x", "top_k": 3}, 422, "top_k"),
        ("field user", {"input": "x", "user": "u"}, 422, "user"),
        ("tools", {"input": "x", "tools": []}, 422, "tool and function calling"),
        ("response_format", {"input": "x", "response_format": {}}, 422, "response_format"),
        ("body over 1 MB", {"input": "x" * 1_100_000}, 413, "1000000 bytes"),
    ]


@pytest.mark.parametrize("route,model", [("/sentiment/v1/classify", "tiny-bert-sequence-classification"),
                                         ("/ner/v1/ner", "tiny-bert-token-classification")])
def test_bad_encoder_bodies_get_4xx_in_openai_shape(server, route, model):
    rows = _encoder_rows(model)
    assert len(rows) >= 50
    problems = check_error_table(f"{BASE}{route}", rows, auth())
    assert not problems, f"{len(problems)} of {len(rows)} rows:\n" + "\n".join(problems)
    odd_but_valid = ["", "\x00\x01 control", "emoji 🦙 中文 العربية", "\u200b\u202e"]
    response = post(route, {"input": odd_but_valid, "model": model})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == len(odd_but_valid)


def test_concurrent_mixed_lengths_keep_the_limit_and_the_batch(server):
    """Issue 11 item 8 under Serve: over-long texts are refused while short ones batch on the model thread."""
    bodies = [{"input": "word " * 100}, {"input": TEXTS[0]}, {"input": ["ok", "word " * 70]}, {"input": TEXTS[1]}] * 6
    with futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda b: post("/sentiment/v1/classify", b).status_code, bodies))
    assert codes == [400, 200, 400, 200] * 6
