"""What LoRA saves on SmolLM2-135M: trainable parameters, checkpoint bytes and step time vs full fine-tuning.

    python -m benchmarks.lora_efficiency [--config configs/finetune/sft_smollm2_lora_cpu.yaml] [--repeats 5]
                                         [--micro-batch 4 --seq-len 64] [--set method.lora.r=4 ...]

The LoRA setup measured is the shipped CPU config (default: r=8, alpha 16, all attention and MLP
projections), built by the fine-tune's own builders (training.finetune_model.build_finetune_model), and
both sides train through the one DeepSpeed engine builder the loop uses (training.engine.build_engine)
with that config's optimizer and ZeRO settings, in one process (world size 1, gloo).

- trainable_frac: trainable / total parameters of the LoRA model (trainable_parameters, as printed at start).
- adapter_frac: bytes of the adapter as exported (peft save_pretrained, safetensors) / bytes of the full
  model checkpoint (save_pretrained, safetensors, fp32: what a full fine-tune exports).
- step_ratio: median LoRA step time / median full step time (forward + backward + optimizer step on the
  same real-text batch), the two sides interleaved A,B,B,A,... after warm-up steps, so that the machine's
  load drifts over both alike. CPU seconds of this process are reported next to the wall clock.

Last line: trainable_frac=... adapter_frac=... step_ratio=...
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "lora_efficiency.json"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "finetune" / "sft_smollm2_lora_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a kind: finetune YAML with method.type lora")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="a tiny HF causal-LM directory instead of the config's model (smoke tests)")
    p.add_argument("--out", default=str(RESULTS_PATH))
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_group() -> None:
    """World size 1 over gloo, as a Ray Train worker would have (DeepSpeed reuses the group)."""
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)


def load_configs(args):
    """(lora_cfg, full_cfg): the given config and the same with method.type full."""
    from training.config import load_config_of_kind

    lora_cfg = load_config_of_kind(args.config, [*args.set, f"optim.micro_batch_size={args.micro_batch}"], "finetune")
    if lora_cfg.method.type != "lora":
        raise SystemExit(f"{args.config}: method.type is {lora_cfg.method.type}; this benchmark compares lora with full")
    raw = lora_cfg.model_dump(mode="json")
    raw["method"] = {"type": "full"}
    full_cfg = type(lora_cfg).model_validate(raw)
    if args.base:
        for cfg in (lora_cfg, full_cfg):
            cfg.model.source, cfg.model.path = "hf_dir", args.base
    return lora_cfg, full_cfg


def plain_base_dir(cfg, workdir: Path) -> tuple[Path, object]:
    """The base as a plain HF directory (a GGUF is dequantized once and re-saved: loads in seconds after)."""
    from transformers import AutoTokenizer

    from benchmarks.finetune_quality import dequantized_hf_dir
    from training.config import resolve_data_path

    path = Path(resolve_data_path(cfg.model.path))
    if cfg.model.source == "gguf":
        path = dequantized_hf_dir(path, workdir / "base-hf")
    return path, AutoTokenizer.from_pretrained(path, local_files_only=True)


def real_text_batch(tokenizer, micro_batch: int, seq_len: int):
    """micro_batch rows of seq_len tokens of real text (stdlib pydoc topics), labels = inputs."""
    import torch

    from serving.tiny_exports import real_text_lines

    ids = tokenizer(" ".join(real_text_lines(400)), add_special_tokens=False)["input_ids"]
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(micro_batch)]
    batch = torch.tensor(rows)
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch.clone()}


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}"))


def timed_step(engine, batch) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of forward + backward + optimizer step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(args) -> dict:
    import torch

    from training.engine import build_engine
    from training.finetune_model import build_finetune_model, trainable_parameters

    torch.set_num_threads(args.threads)
    init_single_process_group()
    lora_cfg, full_cfg = load_configs(args)
    workdir = Path(tempfile.mkdtemp(prefix="raylm-lora-eff-"))
    base_dir, tokenizer = plain_base_dir(lora_cfg, Path(os.environ.get("RAYLM_BENCH_CACHE", workdir)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for cfg in (lora_cfg, full_cfg):
        cfg.model.source, cfg.model.path = "hf_dir", str(base_dir)

    lora_model = build_finetune_model(lora_cfg, base_dir, [], pad)
    full_model = build_finetune_model(full_cfg, base_dir, [], pad)
    trainable, total = trainable_parameters(lora_model)
    full_trainable, full_total = trainable_parameters(full_model)

    lora_model.save_pretrained(workdir / "adapter", safe_serialization=True)
    full_model.save_pretrained(workdir / "full", safe_serialization=True)
    adapter_bytes, full_bytes = dir_bytes(workdir / "adapter"), dir_bytes(workdir / "full")

    batch = real_text_batch(tokenizer, args.micro_batch, args.seq_len)
    engines = {"lora": build_engine(lora_model.train(), lora_cfg, 1), "full": build_engine(full_model.train(), full_cfg, 1)}
    for name, engine in engines.items():
        for _ in range(args.warmup):
            timed_step(engine, batch)
    times: dict[str, list[tuple[float, float]]] = {"lora": [], "full": []}
    for r in range(args.repeats):
        order = ("lora", "full") if r % 2 == 0 else ("full", "lora")  # A,B,B,A,...
        for name in order:
            times[name].append(timed_step(engines[name], batch))
    med = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
    med_cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
    lora = lora_cfg.method.lora
    return {
        "model": lora_cfg.model.path if args.base else str(Path(args.config)),
        "base": str(base_dir),
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules or "default for the architecture"},
        "zero_stage": lora_cfg.deepspeed.zero_stage,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "threads": args.threads,
        "params": {"lora_trainable": trainable, "lora_total": total, "full_trainable": full_trainable, "full_total": full_total},
        "bytes": {"adapter": adapter_bytes, "full_checkpoint": full_bytes},
        "step_s": {n: [round(w, 4) for w, _ in t] for n, t in times.items()},
        "step_cpu_s": {n: [round(c, 4) for _, c in t] for n, t in times.items()},
        "median_step_s": med, "median_step_cpu_s": med_cpu,
        "trainable_frac": trainable / total,
        "adapter_frac": adapter_bytes / full_bytes,
        "step_ratio": med["lora"] / med["full"],
        "step_ratio_cpu": med_cpu["lora"] / med_cpu["full"],
        "load": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "targets": {"trainable_frac": 0.01, "adapter_frac": 0.02, "step_ratio": 0.7},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = measure(args)
    result["load_before"] = load_before
    p = result["params"]
    print(f"LoRA r={result['lora']['r']} on {result['lora']['target_modules']}: {p['lora_trainable']:,} of "
          f"{p['lora_total']:,} parameters train ({result['trainable_frac']:.4%})")
    print(f"adapter {result['bytes']['adapter']:,} B vs full checkpoint {result['bytes']['full_checkpoint']:,} B "
          f"({result['adapter_frac']:.4%})")
    print(f"median step: lora {result['median_step_s']['lora']:.3f} s, full {result['median_step_s']['full']:.3f} s "
          f"(cpu {result['median_step_cpu_s']['lora']:.3f} / {result['median_step_cpu_s']['full']:.3f} s); "
          f"batch {args.micro_batch}x{args.seq_len}, {args.repeats} interleaved repeats")
    print(f"load: before {load_before} | after {result['load']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"trainable_frac={result['trainable_frac']:.5f} adapter_frac={result['adapter_frac']:.5f} "
          f"step_ratio={result['step_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
