"""Exports of fine-tuning checkpoints: merged full models for every task, adapter-only for peft methods.

Merged: full fine-tunes are copied; LoRA adapters are merged into the same base they trained on
(peft merge_and_unload) and checked: the merged model's logits equal the peft model's. Adapter:
peft's files + an `AdapterManifest` (base_model, peft_type, base_shape). Both go through
`training.export.staged_export`: written hidden, re-read by serving's reader, renamed into place.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from serving.export_format import EXPORT_FORMAT, AdapterManifest, ExportManifest, read_adapter, read_export
from training.config import read_yaml
from training.export import EXPORT_FORMAT_VERSION, find_checkpoint, staged_export, write_manifest
from training.finetune_config import TASK_EXPORT_NAMES, FinetuneConfig

PEFT_TYPES = {"lora": "LORA", "prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING"}
# Logits of a merged model may differ from the adapter model's by float rounding, which grows with the
# logits' magnitude and the depth (a LoRA-healed 25-layer SmolLM2-135M: 1.01e-4). The check allows
# MERGE_TOLERANCE per unit of the largest logit (at least 1).
MERGE_TOLERANCE = 1e-4


def merge_tolerance(logits) -> float:
    """The largest max-abs logit difference a merge / reload may show for these reference logits."""
    return MERGE_TOLERANCE * max(1.0, float(logits.abs().max()))


def _checkpoint_facts(checkpoint: Path) -> tuple[FinetuneConfig, dict, dict]:
    cfg = FinetuneConfig.model_validate(read_yaml(checkpoint / "resolved_config.yaml"))
    facts = json.loads((checkpoint / "finetune.json").read_text())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return cfg, facts, state


def base_model_name(cfg: FinetuneConfig, base_path: str) -> str:
    """The name serving knows the base by: a raylm export's model_name, else the directory / file stem."""
    if cfg.model.source == "raylm_export":
        return read_export(base_path).manifest.model_name
    path = Path(base_path)
    return path.stem if cfg.model.source == "gguf" else path.name


def _provenance(checkpoint: Path, state: dict) -> dict:
    return {"source_checkpoint": str(checkpoint.resolve()), "trained_steps": state["step"],
            "eval": state.get("last_eval", {}), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _ner_input(facts: dict) -> dict:
    """How the checkpoint's NER model reads a text (checkpoints from before data.ner_input: single)."""
    return {"ner_input": facts.get("ner_input", "single"), "ner_separator_token_id": facts.get("ner_separator_token_id")}


def load_peft_model(checkpoint: Path, cfg: FinetuneConfig, facts: dict):
    """The base (as trained on) with the checkpoint's adapter, in eval mode."""
    from peft import PeftModel

    from training.finetune_model import load_base

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint / "tokenizer"), local_files_only=True)
    base = load_base(cfg, facts["base_path"], facts["labels"], pad_token_id=tokenizer.pad_token_id)
    return PeftModel.from_pretrained(base, str(checkpoint / "model")).eval()


def _sample_inputs(checkpoint: Path):
    """A short real input for the merge check: the tokenizer on a fixed sentence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint / "tokenizer"), local_files_only=True)
    return tokenizer(["The quick brown fox 跳过了 the lazy dog."], return_tensors="pt")


def merged_model(checkpoint: Path, cfg: FinetuneConfig, facts: dict):
    """(model to save, max abs logit diff merged vs peft or None, its tolerance or None): full weights, or
    the adapter merged in."""
    import torch

    if cfg.method.type == "full":
        from training.finetune_model import _auto_class

        return _auto_class(cfg.task).from_pretrained(str(checkpoint / "model"), local_files_only=True,
                                                     use_safetensors=True), None, None
    if cfg.method.type != "lora":
        raise ValueError(f"a {cfg.method.type} checkpoint cannot be merged into the base weights (virtual tokens "
                         "are inputs, not weights); export it with --adapter")
    peft_model = load_peft_model(checkpoint, cfg, facts)
    inputs = _sample_inputs(checkpoint)
    with torch.no_grad():
        want = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        got = merged(**inputs).logits
    return merged, (got - want).abs().max().item(), merge_tolerance(want)


def export_merged(checkpoint: Path, out_dir: Path, cfg: FinetuneConfig, facts: dict, state: dict, *,
                  verify: bool = True, replace: bool = False) -> dict:
    """Full export (config.json + model.safetensors + tokenizer + raylm.json) that serving loads."""
    model, merge_diff, tolerance = merged_model(checkpoint, cfg, facts)
    if merge_diff is not None and merge_diff > tolerance:
        raise ValueError(f"merged model logits differ from the adapter model's by {merge_diff:.3g} "
                         f"(> {tolerance:.3g}); nothing was exported")
    manifest = ExportManifest(
        format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, task=TASK_EXPORT_NAMES[cfg.task],
        model_name=cfg.run.name, max_seq_len=cfg.data.max_len, labels=facts["labels"],
        base_model=facts["base_path"], method=cfg.method.type, merge_max_abs_diff=merge_diff,
        ner_tag_subtoken=facts.get("ner_tag_subtoken", "first"), **_ner_input(facts), **_provenance(checkpoint, state),
    )

    def write(staged: Path) -> None:
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True  # training turned the KV cache off; generation wants it
        model.save_pretrained(staged, safe_serialization=True)
        for item in (checkpoint / "tokenizer").iterdir():
            shutil.copy2(item, staged / item.name)
        shutil.copy2(checkpoint / "resolved_config.yaml", staged / "resolved_config.yaml")
        write_manifest(staged, manifest)

    def verify_with(staged: Path) -> dict:
        read_export(staged)
        result = manifest.model_dump(mode="json")
        if verify:
            result["verify_logits_max_abs_diff"] = reload_and_compare(staged, model, checkpoint, cfg)
        return result

    return staged_export(out_dir, write, verify_with, replace=replace)


def reload_and_compare(export_dir: Path, model, checkpoint: Path, cfg: FinetuneConfig) -> float:
    """Load the written export with plain transformers (safetensors only); its logits must equal the model's."""
    import torch

    from training.finetune_model import _auto_class

    loaded = _auto_class(cfg.task).from_pretrained(str(export_dir), local_files_only=True, use_safetensors=True).eval()
    inputs = _sample_inputs(checkpoint)
    with torch.no_grad():
        want = model.eval()(**inputs).logits
        diff = (loaded(**inputs).logits - want).abs().max().item()
    if diff > merge_tolerance(want):
        raise ValueError(f"{export_dir}: reloaded export's logits differ by {diff:.3g}; nothing was exported")
    return diff


def export_adapter(checkpoint: Path, out_dir: Path, cfg: FinetuneConfig, facts: dict, state: dict, *,
                   replace: bool = False, model_name: str | None = None) -> dict:
    """Adapter-only export: peft files + raylm.json (AdapterManifest) + the tokenizer.

    `model_name` (default: the run's name) is the name the manifest gives the adapter; publishing passes
    the adapter's served name, so a swept trial's run name does not leak into it.
    """
    if cfg.method.type == "full":
        raise ValueError("a full fine-tune has no adapter; export it without --adapter")
    manifest = AdapterManifest(
        adapter=True, format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, task=TASK_EXPORT_NAMES[cfg.task],
        base_model=base_model_name(cfg, facts["base_path"]), peft_type=PEFT_TYPES[cfg.method.type],
        base_shape=facts["base_shape"], labels=facts["labels"], model_name=model_name or cfg.run.name,
        max_seq_len=cfg.data.max_len, **_provenance(checkpoint, state),
        **({"ner_tag_subtoken": facts.get("ner_tag_subtoken", "first"), **_ner_input(facts)} if cfg.task == "ner" else {}),
    )

    def write(staged: Path) -> None:
        for item in (checkpoint / "model").iterdir():
            if item.is_file():
                shutil.copy2(item, staged / item.name)
        tokenizer_dir = staged / "tokenizer"
        shutil.copytree(checkpoint / "tokenizer", tokenizer_dir)
        write_manifest(staged, manifest)

    def verify_with(staged: Path) -> dict:
        read_adapter(staged)
        return manifest.model_dump(mode="json")

    return staged_export(out_dir, write, verify_with, replace=replace)


def export_finetune(checkpoint: Path, out_dir: Path, *, verify: bool = True, adapter: bool = False,
                    replace: bool = False) -> dict:
    """Export one fine-tuning checkpoint: merged (default) or adapter-only (`adapter=True`)."""
    cfg, facts, state = _checkpoint_facts(checkpoint)
    if adapter:
        return export_adapter(checkpoint, out_dir, cfg, facts, state, replace=replace)
    return export_merged(checkpoint, out_dir, cfg, facts, state, verify=verify, replace=replace)


def publish_adapter(run_or_checkpoint: Path, adapters_dir: Path, name: str | None = None, *, replace: bool = False,
                    which: str = "auto", verify: bool = True) -> dict:
    """Publish a LoRA adapter into a served adapters directory without a restart.

    Staged as `ADAPTERS_DIR/.NAME.tmp-<pid>` (hidden: serving's list_adapters skips it), checked with
    serving's read_adapter, then renamed to `ADAPTERS_DIR/NAME`; an existing NAME is refused unless
    `replace` (then the old one is renamed aside first).
    """
    checkpoint = find_checkpoint(Path(run_or_checkpoint), which)
    cfg, facts, state = _checkpoint_facts(checkpoint)
    if cfg.method.type != "lora":
        raise ValueError(f"serving multiplexes LoRA adapters only; this run used {cfg.method.type} "
                         "(export it with --adapter to a directory instead, or a merged export)")
    adapters_dir = Path(adapters_dir).expanduser().resolve()
    if not adapters_dir.is_dir():
        raise FileNotFoundError(f"--publish-to {adapters_dir}: not a directory (the served adapters directory)")
    name = name or cfg.run.name
    result = export_adapter(checkpoint, adapters_dir / name, cfg, facts, state, replace=replace, model_name=name)
    result["path"] = str(adapters_dir / name)
    return result
