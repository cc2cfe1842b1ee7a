"""Train -> serve: a LoRA fine-tune publishes its adapter into the adapters directory of a running Serve
app, and the next request to `<model>:<adapter>` answers with that adapter, with no restart.

Real local Ray shared by Ray Train (2 DeepSpeed workers on CPU) and Ray Serve (the shipped
causal_lm_cpu.yaml deployed with `serve run`), real HTTP on 127.0.0.1, a tiny Llama base export.
"""

from pathlib import Path

import httpx
import pytest
import torch
import yaml
from serving_fixtures import auth, causal_lm_app_beside_training

from training import finetune
from training.export import main as export_main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HTTP_PORT = 18041
BASE = f"http://127.0.0.1:{HTTP_PORT}"
PROMPT = "这条评论是正面还是负面？质量不错"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    """The causal-LM app running on a tiny base, on the session's shared Ray (tests/conftest.py); its adapters
    directory starts empty."""
    from serving.tiny_exports import build_causal_lm_export

    root = tmp_path_factory.mktemp("train-serve")
    # The default wide initializer keeps greedy choices clear of near-ties, so texts compare exactly.
    base = build_causal_lm_export(root / "tiny-llama", hidden_size=64, num_layers=2, vocab_size=512, max_seq_len=256)
    adapters = root / "adapters"
    adapters.mkdir()
    with causal_lm_app_beside_training(root, base, adapters, HTTP_PORT):
        yield {"root": root, "base": base, "adapters": adapters}


def complete(model: str) -> httpx.Response:
    return httpx.post(f"{BASE}/v1/completions", headers=auth(), timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})


def greedy_text(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """The reference: plain greedy decoding, stopping where the server stops (eos, <|im_end|>)."""
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
            if token in stop:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def write_lora_config(root: Path, base: Path) -> str:
    """A 2-worker LoRA SFT run on the shipped review chats; a high lr so 6 steps visibly change the answers."""
    raw = {
        "kind": "finetune",
        "task": "sft",
        "model": {"source": "raylm_export", "path": str(base)},
        "method": {"type": "lora"},
        "data": {"train_files": [str(REPO / "configs" / "finetune" / "data" / "review_chat.jsonl")],
                 "max_examples": 120, "val_fraction": 0.2, "max_len": 160, "prepared_dir": str(root / "data")},
        "optim": {"lr": 5e-2, "warmup_steps": 1, "max_steps": 6, "micro_batch_size": 4, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": 2, "bucket_elements": 200_000},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        "run": {"name": "chat-lora", "storage_path": str(root), "checkpoint_every_steps": 3, "eval_every_steps": 3,
                "eval_batches": 2, "log_every_steps": 3, "keep_checkpoints": 1},
    }
    path = root / "chat-lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_lora_run_publishes_into_a_running_app_and_the_next_request_uses_it(served):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = httpx.get(f"{BASE}/v1/models", headers=auth(), timeout=30).json()["data"]
    model = models[0]["id"]
    assert [m["id"] for m in models] == [model]  # the base alone: no adapters yet
    base_answer = complete(model)
    assert base_answer.status_code == 200, base_answer.text
    assert complete(f"{model}:chat").status_code == 404  # not published yet

    # Train while the app keeps serving, then publish the best checkpoint's adapter into its directory.
    assert finetune.main(["--config", write_lora_config(served["root"], served["base"])]) == 0
    run_dir = served["root"] / "chat-lora"
    assert export_main([str(run_dir), "--publish-to", str(served["adapters"]), "--name", "chat"]) == 0

    models = httpx.get(f"{BASE}/v1/models", headers=auth(), timeout=30).json()["data"]
    assert f"{model}:chat" in [m["id"] for m in models]
    tuned = complete(f"{model}:chat")
    assert tuned.status_code == 200, tuned.text
    assert complete(model).json()["choices"][0]["text"] == base_answer.json()["choices"][0]["text"]

    tokenizer = AutoTokenizer.from_pretrained(str(served["base"]))
    base = AutoModelForCausalLM.from_pretrained(str(served["base"]), use_safetensors=True).eval()
    expected_base = greedy_text(base, tokenizer, PROMPT, MAX_TOKENS)
    peft_model = PeftModel.from_pretrained(base, str(served["adapters"] / "chat")).eval()
    expected_tuned = greedy_text(peft_model, tokenizer, PROMPT, MAX_TOKENS)
    assert expected_tuned != expected_base  # the adapter changes the answer: the test can tell them apart
    assert base_answer.json()["choices"][0]["text"] == expected_base
    assert tuned.json()["choices"][0]["text"] == expected_tuned  # served with exactly the published adapter
