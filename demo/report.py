"""Stage 5: the summary on the console, `summary.json`, and one PNG of the whole run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def plot_run(pretrain: dict, sweep: dict, served: dict, out: Path) -> Path:
    """One PNG: pretraining loss curves, the sweep's metric per trial over steps, serving latency per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    records = pretrain["records"]
    ax1.plot([r["step"] for r in records if "loss" in r], [r["loss"] for r in records if "loss" in r], label="train")
    val = [r for r in records if r.get("val_loss") is not None]
    ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax1.set(title="1. pretraining (from scratch)", xlabel="step", ylabel="loss")
    ax1.legend()

    metric = sweep["metric"]
    best = (sweep.get("best") or {}).get("trial")
    for trial in sweep["trials"]:
        history = trial.get("history") or []
        if history:
            searched = {k: v for k, v in trial.items() if "." in k}
            label = ", ".join(f"{k.split('.')[-1]}={v:.0e}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in searched.items())
            ax2.plot([s for s, _ in history], [v for _, v in history], "o-", lw=2.5 if trial["trial"] == best else 1,
                     label=f"{label} ({trial['status']})")
    ax2.set(title=f"2. ASHA sweep of the LoRA fine-tune ({metric})", xlabel="step", ylabel=metric)
    ax2.legend(fontsize=7)

    for name, run in served.items():
        latencies_ms = sorted(x * 1000 for x in run["latencies_s"])
        ax3.plot(latencies_ms, [(i + 1) / len(latencies_ms) for i in range(len(latencies_ms))], drawstyle="steps-post",
                 label=f"{name}: {run['requests_per_s']:.1f} req/s, acc {run['accuracy']:.0%}")
    ax3.set(title="3-4. serving latency (held-out reviews)", xlabel="latency (ms)", ylabel="share of requests ≤")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figures(pretrain: dict, sweep: dict, served: dict) -> dict:
    """The per-stage figures of the summary (also written to summary.json)."""
    metric = sweep["metric"]
    best, worst = sweep.get("best") or {}, sweep.get("worst") or {}
    return {
        "pretrain": {"steps": pretrain["steps"], "final_loss": pretrain["final_loss"],
                     "final_val_loss": pretrain["final_val_loss"], "val_perplexity": pretrain["val_perplexity"]},
        "sweep": {"metric": metric, "trials": len(sweep["trials"]),
                  "stopped_early": sum(t["status"] == "stopped early" for t in sweep["trials"]),
                  "best": best.get(f"best_{metric}"), "best_trial": best.get("trial"),
                  "worst": worst.get(f"best_{metric}"), "worst_trial": worst.get("trial")},
        "serving": {name: {"accuracy": run["accuracy"], "no_label": run["no_label"], "requests": run["requests"],
                           "requests_per_s": run["requests_per_s"],
                           "median_latency_ms": statistics.median(run["latencies_s"]) * 1000}
                    for name, run in served.items()},
    }


def print_summary(out, stage_figures: dict, artifacts: dict, try_commands: list[str]) -> None:
    p, s = stage_figures["pretrain"], stage_figures["sweep"]
    print("\nFigures", file=out)
    ppl = f"{p['val_perplexity']:.0f}" if p["val_perplexity"] is not None else "n/a"
    print(f"  1 pretraining: {p['steps']} steps, loss {p['final_loss']:.3f}, validation loss "
          f"{p['final_val_loss']:.3f} (perplexity {ppl})", file=out)
    print(f"  2 sweep: {s['trials']} trials ({s['stopped_early']} stopped early by ASHA); {s['metric']} best "
          f"{s['best']:.4f} ({s['best_trial']}) vs worst {s['worst']:.4f} ({s['worst_trial']})", file=out)
    for name, run in stage_figures["serving"].items():
        print(f"  4 {name}: held-out accuracy {run['accuracy']:.0%} over {run['requests']} reviews "
              f"({run['no_label']} answers without a label; half are positive, so guessing scores 50%), "
              f"{run['requests_per_s']:.1f} requests/s, median latency {run['median_latency_ms']:.0f} ms", file=out)
    print("\nArtifacts", file=out)
    for what, where in artifacts.items():
        print(f"  {what:<22} {where}", file=out)
    print("\nTry the endpoint by hand, then stop it", file=out)
    for command in try_commands:
        print(f"  {command}", file=out)


def write_summary(path: Path, stage_figures: dict, artifacts: dict, try_commands: list[str]) -> None:
    path.write_text(json.dumps({"figures": stage_figures, "artifacts": artifacts, "commands": try_commands},
                               indent=2, ensure_ascii=False, default=str), encoding="utf-8")
