"""Export a training checkpoint as a Hugging Face directory that serving (or anyone) can load.

    python -m training.export runs/demo-cpu/checkpoint_0000300 exports/demo-cpu
    python -m training.export runs/demo-cpu exports/demo-cpu        # the run's latest checkpoint

The directory holds config.json + model.safetensors, the tokenizer, the run's resolved config
and `raylm.json` (task, labels, max length): the contract `serving` reads. No pickles.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from training.checkpoints import latest_complete_checkpoint, manifest_problem
from training.config import read_yaml

EXPORT_FORMAT_VERSION = 1


def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint directory itself, or the latest complete `checkpoint_*` inside a run directory.

    Complete means its manifest verifies (training.checkpoints): a checkpoint half-written when a
    node died is never exported.
    """
    if (path / "model").is_dir() and (path / "trainer_state.json").is_file():
        problem = manifest_problem(path)
        if problem:
            raise FileNotFoundError(f"{path}: incomplete checkpoint ({problem}); export an earlier one of the run")
        return path
    latest = latest_complete_checkpoint(path, warn=lambda msg: print(msg, file=sys.stderr))
    if latest is None:
        raise FileNotFoundError(
            f"{path}: neither a complete raylm checkpoint (model/ + trainer_state.json + a verifying "
            "raylm_manifest.json) nor a run directory holding one"
        )
    return latest


def export_checkpoint(checkpoint: Path, out_dir: Path, verify: bool = True) -> dict:
    """Write the export directory; with `verify`, load it back with transformers and generate."""
    checkpoint = find_checkpoint(Path(checkpoint))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory (nothing was overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)

    for item in (checkpoint / "model").iterdir():
        shutil.copy2(item, out_dir / item.name)
    for item in (checkpoint / "tokenizer").iterdir():
        shutil.copy2(item, out_dir / item.name)
    shutil.copy2(checkpoint / "resolved_config.yaml", out_dir / "resolved_config.yaml")
    run_cfg = read_yaml(checkpoint / "resolved_config.yaml")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    manifest = {
        "format": "raylm-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "task": "causal-lm",
        "model_name": run_cfg["run"]["name"],
        "max_seq_len": run_cfg["data"]["seq_len"],
        "labels": [],
        "adapter": False,
        "source_checkpoint": str(checkpoint.resolve()),
        "trained_steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / "raylm.json").write_text(json.dumps(manifest, indent=2))
    if verify:
        manifest["verify_sample"] = verify_export(out_dir)
    return manifest


def verify_export(out_dir: Path, prompt: str = "这本书") -> str:
    """Load with plain transformers (safetensors only) and greedily generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True, use_safetensors=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory, or a run directory (latest checkpoint)")
    parser.add_argument("out_dir", type=Path, help="new directory for the Hugging Face export")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back and generating")
    args = parser.parse_args(argv)
    try:
        manifest = export_checkpoint(args.checkpoint, args.out_dir, verify=not args.no_verify)
    except (FileNotFoundError, FileExistsError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"[raylm] exported {manifest['source_checkpoint']} (step {manifest['trained_steps']}) -> {args.out_dir}")
    if "verify_sample" in manifest:
        print(f"[raylm] verified: transformers loads it and generates: {manifest['verify_sample']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
