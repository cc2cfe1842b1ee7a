"""The pruning report: each model (original, pruned, healed) measured the same way, as JSON and a PNG.

Per model: parameters, model.safetensors size, tokens/s of whole greedy runs through serving's decode
loop at each batch size (runs of all models interleaved, the order flipping every repeat; medians),
perplexity on the held-out blocks, and greedy next-token agreement with the original on them
(serving.model_compare, the quantization benchmark's metric).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PROMPT_TOKENS = 32


def measure(cfg, exports: dict[str, Path], eval_blocks: list[list[int]]) -> dict:
    """Figures of every export in `exports` (first = the reference), plus ratios to the reference."""
    import os

    import torch

    from serving.export_format import read_export
    from serving.generation import CausalLMEngine
    from serving.model_compare import greedy_agreement, perplexity, timed_run
    from training.prune_ops import count_parameters

    engines = {name: CausalLMEngine(read_export(path)) for name, path in exports.items()}
    reference = next(iter(engines.values()))
    tokenizer = reference.tokenizer
    seq_len = cfg.calibration.seq_len
    prompts = [tokenizer.decode(block[:PROMPT_TOKENS], skip_special_tokens=True) for block in eval_blocks]
    models: dict[str, dict] = {}
    for name, engine in engines.items():
        ppl, positions = perplexity(engine.model, tokenizer, eval_blocks, seq_len)
        agree, _ = greedy_agreement(reference.model, engine.model, tokenizer, eval_blocks, seq_len)
        models[name] = {"path": str(exports[name]), "parameters": count_parameters(engine.model),
                        "file_bytes": (Path(exports[name]) / "model.safetensors").stat().st_size,
                        "num_layers": engine.model.config.num_hidden_layers,
                        "intermediate_size": engine.model.config.intermediate_size,
                        "perplexity": ppl, "agreement": agree, "eval_positions": positions}
        timed_run(engine, prompts, 1, 4)  # warm-up
    runs: dict[tuple[str, int], list[float]] = {}
    names = list(engines)
    for repeat in range(cfg.evaluation.speed_repeats):
        for batch in cfg.evaluation.speed_batches:
            for name in (names if repeat % 2 == 0 else names[::-1]):
                sample = timed_run(engines[name], prompts, batch, cfg.evaluation.speed_tokens)
                runs.setdefault((name, batch), []).append(sample["tok_s"])
    for (name, batch), samples in runs.items():
        models[name][f"tok_s_b{batch}"] = statistics.median(samples)
    ref = models[names[0]]
    for name, figures in models.items():
        figures["params_frac"] = figures["parameters"] / ref["parameters"]
        figures["ppl_ratio"] = figures["perplexity"] / ref["perplexity"]
        for batch in cfg.evaluation.speed_batches:
            figures[f"speedup_b{batch}"] = figures[f"tok_s_b{batch}"] / ref[f"tok_s_b{batch}"]
    with open("/proc/loadavg") as handle:
        load = float(handle.read().split()[0])
    return {"models": models, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "speed_tokens": cfg.evaluation.speed_tokens, "speed_repeats": cfg.evaluation.speed_repeats,
            "eval_blocks": len(eval_blocks), "seq_len": seq_len, "load_average_1m": load}


def plot_report(report: dict, png_path: Path) -> Path:
    """Four panels: parameters, tokens/s per batch size, perplexity, agreement with the original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    names = list(models)
    batches = sorted(int(k.removeprefix("tok_s_b")) for k in models[names[0]] if k.startswith("tok_s_b"))
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=110)
    (ax_params, ax_speed), (ax_ppl, ax_agree) = axes
    ax_params.bar(names, [models[n]["parameters"] / 1e6 for n in names], color="tab:blue")
    ax_params.set_ylabel("parameters (M)")
    width = 0.8 / max(len(batches), 1)
    for i, batch in enumerate(batches):
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(names))]
        ax_speed.bar(xs, [models[n][f"tok_s_b{batch}"] for n in names], width, label=f"batch {batch}")
    ax_speed.set_xticks(range(len(names)), names)
    ax_speed.set_ylabel("tokens/s (greedy, serving loop)")
    ax_speed.legend()
    ax_ppl.bar(names, [models[n]["perplexity"] for n in names], color="tab:orange")
    ax_ppl.set_ylabel("perplexity (held-out)")
    ax_agree.bar(names, [models[n]["agreement"] for n in names], color="tab:green")
    ax_agree.set_ylim(0, 1.02)
    ax_agree.set_ylabel("greedy agreement with original")
    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"structured pruning (load {report['load_average_1m']:.2f}, {report['threads']} threads)")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def write_report(run_dir: Path, report: dict) -> dict[str, Path]:
    """report.json and report.png in the run directory; prints one line per model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "report.json", "png": plot_report(report, run_dir / "report.png")}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for name, m in report["models"].items():
        speeds = " ".join(f"{k}={v:.1f}" for k, v in m.items() if k.startswith("tok_s_b"))
        print(f"[raylm] {name:>8}: {m['parameters']:,} params ({m['params_frac']:.3f}), {m['file_bytes'] / 2**20:.1f} MiB, "
              f"{speeds}, ppl {m['perplexity']:.3f} (x{m['ppl_ratio']:.3f}), agreement {m['agreement']:.4f}")
    return paths
