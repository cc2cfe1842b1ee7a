"""Export a training checkpoint as a directory that serving (or plain transformers / peft) loads.

    python -m training.export runs/demo-cpu/checkpoint_0000300 exports/demo-cpu
    python -m training.export runs/demo-cpu exports/demo-cpu          # latest (pretrain) / best (finetune) checkpoint
    python -m training.export runs/reviews-lora exports/reviews-adapter --adapter
    python -m training.export runs/chat-lora --adapter --publish-to /srv/adapters --name chat-v2 [--replace]

A full export holds config.json + model.safetensors, the tokenizer, the run's resolved config and
`raylm.json`, written with serving's own `ExportManifest` (an adapter: peft files + `AdapterManifest`).
Every export is staged in a hidden sibling directory, re-read with serving's `read_export` /
`read_adapter`, and only then renamed into place: a crash never leaves a directory serving accepts.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.export", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from serving.export_format import EXPORT_FORMAT, AdapterManifest, ExportManifest, read_adapter, read_export
from training.checkpoints import manifest_problem, scan_checkpoints
from training.config import read_yaml

EXPORT_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Which checkpoint


def _is_checkpoint(path: Path) -> bool:
    return (path / "model").is_dir() and (path / "trainer_state.json").is_file()


def best_checkpoint(checkpoints: list[Path]) -> Path | None:
    """The checkpoint the run recorded as best by its selection metric (fine-tuning), if it is still kept."""
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    best = state.get("best")
    if not best:
        return None
    by_step = {json.loads((c / "trainer_state.json").read_text())["step"]: c for c in checkpoints}
    return by_step.get(best["step"])


def find_checkpoint(path: Path, which: str = "auto") -> Path:
    """A complete checkpoint directory itself, or one inside a run directory.

    which: "latest", "best" (by the fine-tune selection metric), or "auto": best for fine-tuning
    runs, latest for pretraining. Complete means its manifest verifies (training.checkpoints): a
    checkpoint half-written when a node died is never exported.
    """
    path = Path(path)
    if _is_checkpoint(path):
        problem = manifest_problem(path)
        if problem:
            raise FileNotFoundError(f"{path}: incomplete checkpoint ({problem}); export an earlier one of the run")
        return path
    complete, skipped = scan_checkpoints(path)
    candidates = [p for p in complete if _is_checkpoint(p)]
    for ckpt, why in skipped:
        if not candidates or ckpt.name > candidates[-1].name:
            print(f"[raylm] warning: skipping incomplete checkpoint {ckpt}: {why}", file=sys.stderr)
    if not candidates:
        raise FileNotFoundError(
            f"{path}: neither a complete raylm checkpoint (model/ + trainer_state.json + a verifying "
            "raylm_manifest.json) nor a run directory holding one"
        )
    kind = read_yaml(candidates[-1] / "resolved_config.yaml").get("kind", "pretrain")
    if which == "best" or (which == "auto" and kind == "finetune"):
        return best_checkpoint(candidates) or candidates[-1]
    return candidates[-1]


# --------------------------------------------------------------------------------------------
# Staging: write hidden, verify with serving's reader, rename into place


def staging_dir(final: Path) -> Path:
    """A hidden sibling of `final` (same filesystem, so the rename is atomic; serving lists skip it)."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def commit_dir(staged: Path, final: Path, replace: bool = False) -> None:
    """Rename the verified staging directory into place; with `replace`, move the old one aside first."""
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif not replace:
            shutil.rmtree(staged, ignore_errors=True)
            raise FileExistsError(f"{final} exists and is not empty; choose a new directory or pass --replace "
                                  "(nothing was overwritten)")
        else:
            aside = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, aside)
            os.rename(staged, final)
            shutil.rmtree(aside, ignore_errors=True)
            return
    os.rename(staged, final)


def write_manifest(directory: Path, manifest: ExportManifest | AdapterManifest) -> None:
    (directory / "raylm.json").write_text(manifest.model_dump_json(indent=2), encoding="utf-8")


def staged_export(final: Path, write, verify_with, replace: bool = False):
    """Run `write(staging_dir)`, check it with `verify_with(staging_dir)` (serving's reader), then rename.

    Returns what `verify_with` returned. Any failure removes the staging directory and leaves
    `final` as it was.
    """
    final = Path(final).expanduser().resolve()
    if final.exists() and not replace and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not empty; choose a new directory or pass --replace "
                              "(nothing was overwritten)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(final)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        write(staged)
        checked = verify_with(staged)
        commit_dir(staged, final, replace=replace)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return checked


# --------------------------------------------------------------------------------------------
# Pretraining checkpoints (causal LM, full weights)


def export_checkpoint(checkpoint: Path, out_dir: Path, verify: bool = True, **finetune_options) -> dict:
    """Export a checkpoint (or a run's latest/best one) into `out_dir`; returns the manifest as a dict.

    Pretraining checkpoints give a full causal-LM export; fine-tuning checkpoints are handed to
    `training.finetune_export.export_finetune` (merged or adapter, see there) with `finetune_options`.
    With `verify`, a causal LM is loaded back with transformers and generates before it is declared done.
    """
    checkpoint = find_checkpoint(Path(checkpoint), finetune_options.pop("which", "auto"))
    run_cfg = read_yaml(checkpoint / "resolved_config.yaml")
    if run_cfg.get("kind") == "finetune":
        from training.finetune_export import export_finetune

        return export_finetune(checkpoint, Path(out_dir), verify=verify, **finetune_options)
    if finetune_options.get("adapter"):
        raise ValueError(f"{checkpoint} is a pretraining checkpoint: it has full weights, no adapter; drop --adapter")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    manifest = ExportManifest(
        format=EXPORT_FORMAT,
        format_version=EXPORT_FORMAT_VERSION,
        task="causal-lm",
        model_name=run_cfg["run"]["name"],
        max_seq_len=run_cfg["data"]["seq_len"],
        labels=[],
        source_checkpoint=str(checkpoint.resolve()),
        trained_steps=state["step"],
        tokens_seen=state["tokens_seen"],
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )

    def write(staged: Path) -> None:
        for item in (checkpoint / "model").iterdir():
            shutil.copy2(item, staged / item.name)
        for item in (checkpoint / "tokenizer").iterdir():
            shutil.copy2(item, staged / item.name)
        shutil.copy2(checkpoint / "resolved_config.yaml", staged / "resolved_config.yaml")
        write_manifest(staged, manifest)

    def verify_with(staged: Path) -> dict:
        read_export(staged)  # serving's reader: the contract holds before the export exists
        result = manifest.model_dump(mode="json")
        if verify:
            result["verify_sample"] = verify_export(staged)
        return result

    return staged_export(Path(out_dir), write, verify_with, replace=finetune_options.get("replace", False))


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
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory, or a run directory")
    parser.add_argument("out_dir", type=Path, nargs="?", help="new directory for the export (not with --publish-to)")
    parser.add_argument("--which", choices=["auto", "best", "latest"], default="auto",
                        help="checkpoint of a run directory: auto = best for fine-tuning, latest for pretraining")
    parser.add_argument("--adapter", action="store_true", help="fine-tuning with LoRA/prompt/prefix: adapter-only export")
    parser.add_argument("--publish-to", type=Path, metavar="ADAPTERS_DIR",
                        help="publish the adapter into a served adapters directory (staged there, renamed into place)")
    parser.add_argument("--name", help="adapter name under --publish-to (default: the run name)")
    parser.add_argument("--replace", action="store_true", help="replace an existing export / adapter of that name")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back")
    args = parser.parse_args(argv)
    if args.publish_to is None and args.out_dir is None:
        parser.error("give OUT_DIR, or --publish-to ADAPTERS_DIR [--name NAME]")
    if args.publish_to is not None and args.out_dir is not None:
        parser.error("give either OUT_DIR or --publish-to, not both")
    options = {"which": args.which}
    if args.adapter or args.publish_to is not None:
        options["adapter"] = True
    if args.replace:
        options["replace"] = True
    try:
        if args.publish_to is not None:
            from training.finetune_export import publish_adapter

            manifest = publish_adapter(args.checkpoint, args.publish_to, args.name, replace=args.replace,
                                       which=args.which, verify=not args.no_verify)
            out = manifest["path"]
        else:
            manifest = export_checkpoint(args.checkpoint, args.out_dir, verify=not args.no_verify, **options)
            out = args.out_dir
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"[raylm] exported {manifest['source_checkpoint']} (step {manifest['trained_steps']}) -> {out}")
    if "verify_sample" in manifest:
        print(f"[raylm] verified: transformers loads it and generates: {manifest['verify_sample']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
