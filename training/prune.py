"""Structured pruning of a causal-LM export: drop layers / shrink MLPs, optionally heal, export, report.

    python -m training.prune --config configs/prune/smollm2_quarter_cpu.yaml [--set prune.param_fraction=0.3]

Reads top to bottom as the algorithm: parse -> validate (config, then the input export, the text
files and the output directory, every problem at once) -> read calibration text -> score and slice
(training.prune_ops) -> write the pruned export -> heal it with a normal fine-tune (Ray Train +
DeepSpeed, training.finetune's builders) and merge -> write the final export -> measure and report
(<run_dir>/report.json + report.png: parameters, file size, tokens/s, perplexity, agreement).
Every export is staged hidden, re-read with serving's `read_export`, then renamed into place.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.prune", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

from serving.export_format import EXPORT_FORMAT, ExportFormatError, ExportManifest, PruningRecord, read_export
from training.config import ConfigError, load_config_of_kind, resolve_data_path
from training.prune_config import PruneConfig

HEAL_PROMPT = {"role": "user", "content": "Continue the text."}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="pruning YAML with kind: prune (see configs/prune/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set prune.param_fraction=0.3 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster the healing fine-tune attaches to (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--validate-only", action="store_true", help="check the config and its inputs, then exit")
    return parser.parse_args(argv)


def expand_text_files(specs: list[str], key: str) -> list[Path]:
    """pkg:// specs and globs -> existing files; raises ValueError naming the key."""
    from training.data import expand_files

    try:
        return expand_files(specs)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(str(err).replace("data.train_files", key)) from None


def input_problems(cfg: PruneConfig) -> list[str]:
    """What is wrong with the run's inputs and output (checked before any model is loaded)."""
    problems = []
    try:
        export = read_export(resolve_data_path(cfg.model.path))
        if export.task != "causal-lm":
            problems.append(f"model.path: {export.path} is a {export.task} export; training.prune handles causal-lm exports")
    except (ExportFormatError, FileNotFoundError) as err:
        problems.append(f"model.path: {err}")
    for specs, key in ((cfg.calibration.files, "calibration.files"), (cfg.evaluation.files, "evaluation.files")):
        try:
            if specs:
                expand_text_files(specs, key)
        except ValueError as err:
            problems.append(str(err))
    out = Path(cfg.output.dir).expanduser()
    if out.exists() and not cfg.output.replace and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"output.dir: {out} exists and is not empty; choose a new directory or set output.replace: true")
    return problems


def token_blocks(tokenizer, files: list[Path], count: int, seq_len: int, key: str) -> list[list[int]]:
    """`count` blocks of `seq_len` token ids from the files' lines, read in order until enough are found."""
    need, ids = count * seq_len, []
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    ids.extend(tokenizer(line.rstrip("\n") + "\n", add_special_tokens=False)["input_ids"])
                if len(ids) >= need:
                    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(count)]
    raise ValueError(f"{key}: {len(ids)} tokens of text, {need} needed ({count} blocks of {seq_len}); add text or "
                     "lower the block counts")


def read_text_blocks(cfg: PruneConfig, tokenizer) -> dict[str, list[list[int]]]:
    """Held-out, calibration and healing blocks. Held-out blocks never overlap the other two."""
    seq_len, calib = cfg.calibration.seq_len, cfg.calibration.num_sequences
    heal = cfg.heal.num_sequences if cfg.heal and cfg.heal.data is None else 0
    held_out = cfg.evaluation.num_sequences
    files = expand_text_files(cfg.calibration.files, "calibration.files")
    if cfg.evaluation.files:
        eval_files = expand_text_files(cfg.evaluation.files, "evaluation.files")
        eval_blocks = token_blocks(tokenizer, eval_files, held_out, seq_len, "evaluation.files")
        blocks = token_blocks(tokenizer, files, max(calib, heal), seq_len, "calibration.files")
    else:
        blocks = token_blocks(tokenizer, files, held_out + max(calib, heal), seq_len, "calibration.files")
        eval_blocks, blocks = blocks[:held_out], blocks[held_out:]
    return {"eval": eval_blocks, "calibration": blocks[:calib], "heal": blocks[:heal]}


def prune_model(cfg: PruneConfig, model, calibration):
    """(pruned model, what was removed): layers first (scored on the original), then MLP width (scored after)."""
    import torch

    from training.prune_ops import (channel_importance, check_supported, count_parameters, drop_layers,
                                    layer_similarity, least_changing_layers, plan_pruning, shrink_mlp, top_channels)

    check_supported(model)
    config, blocks = model.config, torch.tensor(calibration)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    plan = plan_pruning(total_params=count_parameters(model), num_layers=config.num_hidden_layers,
                        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                        layer_params=layer_params, methods=cfg.prune.methods, param_fraction=cfg.prune.param_fraction,
                        num_layers_to_remove=cfg.prune.num_layers, layer_share=cfg.prune.layer_share,
                        width_multiple=cfg.prune.width_multiple)
    facts = {"plan": plan.__dict__, "removed_layers": [], "layer_similarity": None}
    pruned = model
    if plan.num_layers_removed:
        similarity = layer_similarity(model, blocks)
        facts["layer_similarity"] = similarity
        facts["removed_layers"] = least_changing_layers(similarity, plan.num_layers_removed)
        print(f"[raylm] layer similarity (input vs output): {[round(s, 4) for s in similarity]}")
        print(f"[raylm] dropping layers {facts['removed_layers']}")
        pruned = drop_layers(model, facts["removed_layers"])
    if plan.intermediate_size < config.intermediate_size:
        keep = top_channels(channel_importance(pruned, blocks), plan.intermediate_size)
        print(f"[raylm] MLP width {config.intermediate_size} -> {plan.intermediate_size}")
        pruned = shrink_mlp(pruned, keep)
    return pruned, facts


def model_shape(model) -> dict:
    """What the pruning record compares before and after: layers, MLP width, parameters."""
    from training.prune_ops import count_parameters

    return {"num_layers": model.config.num_hidden_layers, "intermediate_size": model.config.intermediate_size,
            "parameters": count_parameters(model)}


def pruning_record(cfg: PruneConfig, source, before: dict, after: dict, facts: dict,
                   heal_steps: int | None) -> PruningRecord:
    return PruningRecord(
        source_model=source.manifest.model_name, source_path=str(source.path), methods=cfg.prune.methods,
        removed_layers=facts["removed_layers"], **{key: (before[key], after[key]) for key in before},
        healing=cfg.heal.method.type if cfg.heal and heal_steps else None, healing_steps=heal_steps)


def write_export(out_dir: Path, model, tokenizer, source, record: PruningRecord, cfg: PruneConfig, *,
                 replace: bool) -> dict:
    """A normal causal-LM export of `model` (serving loads it unchanged) whose manifest carries `record`."""
    from training.export import EXPORT_FORMAT_VERSION, staged_export, verify_export, write_manifest

    manifest = ExportManifest(
        format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, task="causal-lm",
        model_name=cfg.output.model_name or cfg.run.name, max_seq_len=source.manifest.max_seq_len, labels=[],
        pruning=record, base_model=source.manifest.model_name,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def write(staged: Path) -> None:
        model.config.use_cache = True
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        (staged / "resolved_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        write_manifest(staged, manifest)

    def verify_with(staged: Path) -> dict:
        read_export(staged)  # serving's reader: the contract holds before the export exists
        return {**manifest.model_dump(mode="json"), "verify_sample": verify_export(staged, prompt="The")}

    return staged_export(out_dir, write, verify_with, replace=replace)


def write_heal_rows(path: Path, tokenizer, blocks: list[list[int]]) -> Path:
    """sft rows (jsonl) whose labelled tokens are the blocks' text: each block is the reply to a fixed user turn.

    A conversation opening with the reply would, under templates that insert a default system prompt
    (SmolLM2's), have that prompt labelled instead of the text."""
    with path.open("w", encoding="utf-8") as handle:
        for block in blocks:
            reply = {"role": "assistant", "content": tokenizer.decode(block, skip_special_tokens=True)}
            handle.write(json.dumps({"messages": [HEAL_PROMPT, reply]}, ensure_ascii=False) + "\n")
    return path


def heal(cfg: PruneConfig, pruned_dir: Path, tokenizer, heal_blocks: list[list[int]], address: str | None):
    """Fine-tune the pruned export through training.finetune's path, merge, and return (model, steps trained)."""
    from dataclasses import asdict

    import ray
    from transformers import AutoModelForCausalLM

    from training import driver
    from training.export import find_checkpoint
    from training.finetune import build_trainer
    from training.finetune_export import export_finetune
    from training.finetune_prep import prepare_finetune_data

    heal_file = write_heal_rows(cfg.run_dir / "heal.jsonl", tokenizer, heal_blocks)
    ft_cfg = cfg.heal_finetune_config(str(pruned_dir), str(heal_file))
    shutil.rmtree(ft_cfg.run_dir, ignore_errors=True)  # a new pruned model: an old healing run cannot resume
    shutil.rmtree(ft_cfg.data_dir, ignore_errors=True)
    prepared_data = prepare_finetune_data(ft_cfg)
    prepared = {k: v for k, v in asdict(prepared_data).items() if k != "stats"}
    started_here = not ray.is_initialized()
    driver.start_ray(ft_cfg, address)
    try:
        result = driver.fit_with_progress(ft_cfg, build_trainer(ft_cfg, prepared))
    finally:
        if started_here:  # an idle local Ray would share the CPUs with the speed measurements that follow
            ray.shutdown()
    if result is None:
        raise RuntimeError(f"the healing fine-tune failed; its logs are under {ft_cfg.run_dir}")
    checkpoint = find_checkpoint(ft_cfg.run_dir, "auto")
    merged_dir = cfg.run_dir / "healed-merged"
    merged = export_finetune(checkpoint, merged_dir, replace=True)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True, use_safetensors=True)
    return model.eval(), merged["trained_steps"]


def copy_export(export_dir: Path, out_dir: Path, *, replace: bool) -> None:
    """Copy a verified export into place the staged way (hidden copy, serving's reader, rename)."""
    from training.export import staged_export

    def write(staged: Path) -> None:
        for item in export_dir.iterdir():
            shutil.copy2(item, staged / item.name)

    staged_export(out_dir, write, read_export, replace=replace)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_of_kind(args.config, args.set, "prune")
        problems = input_problems(cfg)
        if problems:
            raise ConfigError(problems, args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.config}: valid")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.prune_report import measure, write_report

    if cfg.evaluation.threads:
        torch.set_num_threads(cfg.evaluation.threads)
    torch.manual_seed(cfg.run.seed)
    source = read_export(resolve_data_path(cfg.model.path))
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, use_safetensors=True,
                                                    dtype=torch.float32).eval()
    try:
        blocks = read_text_blocks(cfg, tokenizer)
        pruned, facts = prune_model(cfg, original, blocks["calibration"])
    except ValueError as err:
        print(f"prune: {err}", file=sys.stderr)
        return 2
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    pruned_dir = cfg.run_dir / "pruned"
    before, after = model_shape(original), model_shape(pruned)
    record = pruning_record(cfg, source, before, after, facts, None)
    write_export(pruned_dir, pruned, tokenizer, source, record, cfg, replace=True)
    print(f"[raylm] pruned: {before['parameters']:,} -> {after['parameters']:,} parameters -> {pruned_dir}")
    del original, pruned  # the healing workers and the measurements load what they need from the exports
    gc.collect()
    exports = {"original": source.path, "pruned": pruned_dir}
    out_dir = Path(cfg.output.dir).expanduser().resolve()
    heal_steps = None
    if cfg.heal:
        healed, heal_steps = heal(cfg, pruned_dir, tokenizer, blocks["heal"], args.address)
        record = pruning_record(cfg, source, before, model_shape(healed), facts, heal_steps)
        write_export(out_dir, healed, tokenizer, source, record, cfg, replace=cfg.output.replace)
        exports["healed"] = out_dir
        del healed
        gc.collect()
    else:
        copy_export(pruned_dir, out_dir, replace=cfg.output.replace)
    report = measure(cfg, exports, blocks["eval"])
    report.update(pruning=record.model_dump(mode="json"), removed_layers=facts["removed_layers"],
                  layer_similarity=facts["layer_similarity"], output=str(out_dir), healing_steps=heal_steps)
    paths = write_report(cfg.run_dir, report)
    print(f"[raylm] export: {out_dir}  report: {paths['json']}  plot: {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
