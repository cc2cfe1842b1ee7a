"""A user's fine-tuning files -> the base's tokenizer -> one Parquet file per split (+ manifest.json).

Runs on the driver before any worker is requested; the reading and encoding rules are G's
`training.finetune_data`. Cached by a fingerprint of the inputs like pretraining's data, so a rerun
(or a resume after a crash) reads the same rows in the same order.

Columns (one row per example, padded at collate time):
  sft             input_ids list<int32>, labels list<int32> (-100 = no loss)
  classification  input_ids list<int32>, label int64
  ner             input_ids list<int32>, labels list<int32>, word_ids list<int32>
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serving.export_format import ner_copy_max_len
from training.config import resolve_data_path
from training.data import _is_validation, expand_files
from training.finetune_config import FinetuneConfig

PREP_VERSION = 3  # 2: NER labels a causal base's words on their last sub-token; 3: data.ner_input
SCHEMAS = {
    "sft": pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]),
    "classification": pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int64())]),
    "ner": pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("word_ids", pa.list_(pa.int32()))]),
}


@dataclass
class PreparedFinetune:
    """Paths and facts the workers and the export need from data preparation."""

    task: str
    train_path: str
    val_path: str
    tokenizer_dir: str
    labels: list[str]
    pad_token_id: int
    eos_token_id: int | None
    train_rows: int
    val_rows: int
    stats: dict
    ner_tag_subtoken: str = "first"  # ner: the sub-token of a word that carries its tag (encode_ner)
    ner_input: str = "single"  # ner: 'single' or 'doubled' (text <sep> text, labels on the second copy)
    ner_separator_token_id: int | None = None  # ner, doubled: the token between the copies


def base_model_path(cfg: FinetuneConfig) -> Path:
    """The base's directory (raylm_export, hf_dir) or .gguf file, pkg:// resolved."""
    return Path(resolve_data_path(cfg.model.path))


def load_base_tokenizer(cfg: FinetuneConfig):
    """The base model's own tokenizer (never a hub download); pad falls back to eos, no tokens are added."""
    from transformers import AutoTokenizer

    path = base_model_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"model.path: {cfg.model.path!r} ({path}) does not exist; point it at a local "
                                f"{'.gguf file' if cfg.model.source == 'gguf' else 'model directory'}")
    if cfg.model.source == "raylm_export":
        from serving.export_format import read_export

        read_export(path)  # a raylm export must follow the contract before it is trained on
    if cfg.model.source == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        # Adding a pad token would grow the vocabulary (and the embeddings an adapter sits on): reuse eos.
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token; batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_model_type(cfg: FinetuneConfig) -> str:
    """model_type of the base's config (read from config.json, or from the GGUF file's metadata)."""
    from transformers import AutoConfig

    path = base_model_path(cfg)
    if cfg.model.source == "gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True).model_type
    return AutoConfig.from_pretrained(str(path), local_files_only=True,
                                      trust_remote_code=cfg.model.trust_remote_code).model_type


def fingerprint(cfg: FinetuneConfig, train_files: list[Path], val_files: list[Path]) -> str:
    """Hash of everything that determines the prepared rows."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": PREP_VERSION,
        "task": cfg.task,
        "data": cfg.data.model_dump(mode="json", exclude={"prepared_dir", "train_files", "val_files"}),
        "model": [cfg.model.source, cfg.model.path],
        "virtual_tokens": cfg.method.num_virtual_tokens if cfg.method.type in ("prompt_tuning", "prefix_tuning") else 0,
        "seed": cfg.run.seed,
    }, sort_keys=True).encode())
    for tag, files in (("train", train_files), ("val", val_files)):
        for f in files:
            st = f.stat()
            h.update(f"{tag}:{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def read_records(cfg: FinetuneConfig, files: list[Path], stats):
    """The task's reader over `files`, with the field names of the config."""
    from training import finetune_data as fd

    d = cfg.data
    if cfg.task == "sft":
        return fd.read_sft_records(files, messages_field=d.messages_field, prompt_field=d.prompt_field,
                                   response_field=d.response_field, system_field=d.system_field, stats=stats)
    if cfg.task == "classification":
        return fd.read_classification_records(files, text_field=d.text_field, label_field=d.label_field, stats=stats)
    return fd.read_ner_records(files, fmt=d.ner_format, token_column=d.token_column, tag_column=d.tag_column,
                               tokens_field=d.tokens_field, tags_field=d.tags_field, scheme=d.tag_scheme, stats=stats)


def split_records(cfg: FinetuneConfig, train_files: list[Path], val_files: list[Path], stats) -> tuple[list, list]:
    """(train, val) records: val from its own files, else a stable per-row hash split of the train rows."""
    records = read_records(cfg, train_files, stats)
    train, val = [], []
    for index, (record, _where) in enumerate(records):
        if cfg.data.max_examples is not None and index >= cfg.data.max_examples:
            break
        if not val_files and _is_validation(index, cfg.run.seed, cfg.data.val_fraction):
            val.append(record)
        else:
            train.append(record)
    if val_files:
        val = [record for record, _ in read_records(cfg, val_files, stats)]
    return train, val


def label_set(cfg: FinetuneConfig, train: list) -> list[str]:
    """Labels in id order, from the training split only (sorted: the same order on every rerun)."""
    from training import finetune_data as fd

    if cfg.task == "classification":
        return sorted({label for _, label in train})
    if cfg.task == "ner":
        return fd.ner_label_list(tag for _, tags in train for tag in tags)
    return []


def encode_split(cfg: FinetuneConfig, tokenizer, records: list, labels: list[str], stats, split: str,
                 ner_tag_subtoken: str = "first", ner_separator_token_id: int | None = None) -> dict:
    """Columns of one split; validation rows with labels unseen in training are counted and left out."""
    from training import finetune_data as fd

    max_len = cfg.data.max_len
    if cfg.method.type == "prompt_tuning" or cfg.method.type == "prefix_tuning":
        max_len -= cfg.method.num_virtual_tokens  # the virtual tokens share the position budget
    label2id = {label: i for i, label in enumerate(labels)}
    columns: dict[str, list] = {name: [] for name in SCHEMAS[cfg.task].names}
    if cfg.task == "sft":
        examples = []
        for messages in records:
            encoded = fd.encode_sft(tokenizer, messages, max_len=max_len, chat_template=cfg.data.chat_template,
                                    stats=stats)
            if encoded is not None:
                examples.append(encoded)
        if cfg.data.packing:
            examples = fd.pack_sft(examples, max_len)
        for ids, lab in examples:
            columns["input_ids"].append(ids)
            columns["labels"].append(lab)
    elif cfg.task == "classification":
        for text, label in records:
            if label not in label2id:
                stats.unknown_labels += 1
                continue
            columns["input_ids"].append(fd.encode_classification(tokenizer, text, max_len=max_len, stats=stats))
            columns["label"].append(label2id[label])
    else:
        for words, tags in records:
            if any(tag not in label2id for tag in tags):
                stats.unknown_labels += 1
                continue
            ids, lab, word_ids = fd.encode_ner(tokenizer, words, tags, label2id, max_len=max_len,
                                              tag_subtoken=ner_tag_subtoken,
                                              separator_token_id=ner_separator_token_id, stats=stats)
            columns["input_ids"].append(ids)
            columns["labels"].append(lab)
            columns["word_ids"].append(word_ids)
    return columns


def _write_split(path: Path, task: str, columns: dict, shuffle_seed: int | None) -> int:
    rows = len(columns["input_ids"])
    order = list(range(rows))
    if shuffle_seed is not None:
        # Shuffled once, here, so training reads a fixed random order (what makes resume exact).
        random.Random(shuffle_seed).shuffle(order)
    table = pa.table({k: [v[i] for i in order] for k, v in columns.items()}, schema=SCHEMAS[task])
    pq.write_table(table, path, row_group_size=2048)
    return rows


def prepare_finetune_data(cfg: FinetuneConfig, log=print) -> PreparedFinetune:
    """Read, split, label, encode and write the splits once; later calls with the same inputs reuse them."""
    from training import finetune_data as fd

    train_files = expand_files(cfg.data.train_files)
    val_files = expand_files(cfg.data.val_files) if cfg.data.val_files else []
    out = cfg.data_dir / fingerprint(cfg, train_files, val_files)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        log(f"[data] reusing prepared {cfg.task} rows in {out}")
        return PreparedFinetune(**json.loads(manifest_path.read_text())["prepared"])

    tokenizer = load_base_tokenizer(cfg)
    stats = fd.TaskDataStats()
    train, val = split_records(cfg, train_files, val_files, stats)
    labels = label_set(cfg, train)
    if cfg.task == "classification" and len(labels) < 2:
        raise ValueError(f"data: the training split has {len(labels)} label(s) {labels} in '{cfg.data.label_field}'; "
                         "classification needs at least 2 (check data.label_field)")
    # A causal base sees a word whole only at its last sub-token: NER tags go there (encode_ner).
    tag_subtoken = fd.ner_tag_subtoken(base_model_type(cfg)) if cfg.task == "ner" else "first"
    # ... and sees no right context unless the sentence comes twice (data.ner_input).
    ner_input = fd.resolve_ner_input(cfg.data.ner_input, tag_subtoken) if cfg.task == "ner" else "single"
    separator = fd.ner_separator(tokenizer) if ner_input == "doubled" else None
    train_columns = encode_split(cfg, tokenizer, train, labels, stats, "train", tag_subtoken, separator)
    val_columns = encode_split(cfg, tokenizer, val, labels, stats, "val", tag_subtoken, separator)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = _write_split(out / "train.parquet", cfg.task, train_columns, cfg.run.seed)
    val_rows = _write_split(out / "val.parquet", cfg.task, val_columns, None)
    world_rows = cfg.optim.micro_batch_size * cfg.scaling.num_workers
    if train_rows < world_rows:
        raise ValueError(f"data: {train_rows} training example(s) after skips, fewer than one global batch "
                         f"(optim.micro_batch_size x scaling.num_workers = {world_rows}); add rows or lower them")
    if val_rows == 0:
        raise ValueError("data: the validation split is empty (after skips and unknown labels); give data.val_files "
                         "or raise data.val_fraction")
    tokenizer_dir = out / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    prepared = PreparedFinetune(
        task=cfg.task, train_path=str(out / "train.parquet"), val_path=str(out / "val.parquet"),
        tokenizer_dir=str(tokenizer_dir), labels=labels, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, train_rows=train_rows, val_rows=val_rows, stats=asdict(stats),
        ner_tag_subtoken=tag_subtoken, ner_input=ner_input, ner_separator_token_id=separator,
    )
    # Written last: its presence means the directory is complete.
    manifest_path.write_text(json.dumps({"prepared": asdict(prepared), "labels": labels}, indent=2, ensure_ascii=False))
    log(f"[data] {cfg.task}: {stats.rows} rows read -> {train_rows} train / {val_rows} val examples"
        f"{f', {len(labels)} labels' if labels else ''}; skipped {stats.skipped} (empty {stats.skipped_empty}, "
        f"malformed {stats.skipped_malformed}, too long {stats.skipped_too_long}), truncated {stats.truncated}, "
        f"validation rows with unknown labels {stats.unknown_labels}"
        + (f"; tags on each word's {tag_subtoken} sub-token" if cfg.task == "ner" else "")
        + (f"; input doubled (text, token {separator}, text; labels on the second copy), each copy at most "
           f"{ner_copy_max_len(cfg.data.max_len, ner_input)} tokens (data.max_len {cfg.data.max_len})"
           if ner_input == "doubled" else ""))
    for note in stats.notes[:5]:
        log(f"[data]   {note}")
    return prepared
