"""The scheduled re-fine-tuning story on one machine: a running Serve app answers `<model>:reviews` with a poor
adapter; a real LoRA fine-tune (Ray Train, 2 DeepSpeed workers on CPU) produces a run; training.promote judges the
run's best checkpoint against the served adapter and replaces it under the same name; the next request is answered
with the promoted weights, by the same replica, with no restart.

Real local Ray (Train and Serve share it, as in test_finetune_serve), the shipped causal_lm_cpu.yaml deployed with
`serve run`, real HTTP on 127.0.0.1, a tiny Llama base export and adapters built in-process (promote_fixtures).
"""

import json
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from promote_fixtures import NAME, REVIEWS, build_world, setup_served, write_config
from serving_fixtures import auth, causal_lm_app_beside_training

from training import finetune, promote

pytestmark = pytest.mark.slow

HTTP_PORT = 18051
BASE = f"http://127.0.0.1:{HTTP_PORT}"
PROMPT = "这条评论是正面还是负面？质量不错"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    """The causal-LM app on a tiny base, on the session's shared Ray (tests/conftest.py), serving the poor
    adapter as `reviews`."""
    root = tmp_path_factory.mktemp("promote-serve")
    world = build_world(root)
    adapters = setup_served(world, root, world["bad"])
    with causal_lm_app_beside_training(root, world["base"], adapters, HTTP_PORT):
        yield {**world, "root": root, "adapters": adapters}


def complete(model: str) -> str:
    response = httpx.post(f"{BASE}/v1/completions", headers=auth(), timeout=120,
                          json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def greedy_text(base, adapter) -> str:
    """The reference: plain greedy decoding with peft, stopping where the server stops (eos, <|im_end|>)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True),
                                      str(adapter)).eval()
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids, generated = tokenizer(PROMPT, add_special_tokens=False)["input_ids"], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            token = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
            if token in stop:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def write_lora_config(root: Path, base: Path) -> Path:
    """A 2-worker LoRA SFT run on the shipped review chats (not the test rows), high lr so 6 steps change answers."""
    raw = {
        "kind": "finetune", "task": "sft",
        "model": {"source": "raylm_export", "path": str(base)},
        "method": {"type": "lora"},
        "data": {"train_files": [str(root / "fresh.jsonl")], "val_fraction": 0.2, "max_len": 160,
                 "prepared_dir": str(root / "data")},
        "optim": {"lr": 5e-2, "warmup_steps": 1, "max_steps": 6, "micro_batch_size": 4, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": 2, "bucket_elements": 200_000},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "run": {"name": "refresh-1", "storage_path": str(root / "runs"), "checkpoint_every_steps": 3,
                "eval_every_steps": 3, "eval_batches": 2, "log_every_steps": 3, "keep_checkpoints": 2},
    }
    rows = REVIEWS.read_text(encoding="utf-8").splitlines()[24:144]  # the first 24 are the fixed test file
    (root / "fresh.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    path = root / "refresh.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def history(adapters: Path) -> list[dict]:
    return [json.loads(line) for line in (adapters / "promotions.jsonl").read_text().splitlines()]


def test_a_fresh_run_is_promoted_into_the_running_replica_under_the_same_name(served, tmp_path):
    model = httpx.get(f"{BASE}/v1/models", headers=auth(), timeout=30).json()["data"][0]["id"]
    adapters, served_dir = served["adapters"], served["adapters"] / NAME
    assert complete(f"{model}:{NAME}") == greedy_text(served["base"], served["bad"])  # the replica holds it now

    # The scheduled run: fine-tune on the fresh rows, then promote the run (its best checkpoint's adapter).
    assert finetune.main(["--config", str(write_lora_config(tmp_path, served["base"]))]) == 0
    config = write_config(served, tmp_path, adapters, tmp_path / "runs" / "refresh-1")
    assert promote.main(["--config", str(config)]) == 0
    (record,) = history(adapters)
    assert record["decision"] == "promoted", record["reason"]  # 6 steps beat random LoRA weights on the test rows
    assert record["candidate"]["source_checkpoint"].startswith(str((tmp_path / "runs" / "refresh-1").resolve()))
    expected = greedy_text(served["base"], served_dir)
    assert expected != greedy_text(served["base"], served["bad"])  # the test can tell the two apart
    assert complete(f"{model}:{NAME}") == expected  # same name, same replica, the promoted weights

    # A second candidate (trained in-process): whatever the scores say, serving follows the directory.
    config = write_config(served, tmp_path, adapters, served["good"])
    assert promote.main(["--config", str(config)]) == 0
    second = history(adapters)[-1]
    better = second["candidate"]["value"] <= second["served"]["value"]
    assert second["decision"] == ("promoted" if better else "kept") and second["published"] is better
    assert complete(f"{model}:{NAME}") == greedy_text(served["base"], served_dir)
    ids = [m["id"] for m in httpx.get(f"{BASE}/v1/models", headers=auth(), timeout=30).json()["data"]]
    assert ids == [model, f"{model}:{NAME}"]  # staged copies never show up as adapters
