"""Raw text -> tokenizer -> packed fixed-length token blocks in Parquet -> Ray Data.

Runs on the driver before any worker is requested. Preparation is cached by a fingerprint of
the inputs, so rerunning a command (or resuming after a crash) reuses the same blocks in the
same order; that fixed order is what makes resume and fault recovery reproduce a clean run.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from training.config import PretrainConfig, resolve_data_path

BLOCK_SCHEMA = pa.schema([("block_id", pa.int64()), ("input_ids", pa.list_(pa.int32()))])
SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "unk_token": None}
PREP_VERSION = 1  # bump when the on-disk layout or packing changes


@dataclass
class CorpusStats:
    """What was read, and what was skipped and why (never a crash for a bad row)."""

    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_malformed: int = 0
    train_documents: int = 0
    val_documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    dropped_tail_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_empty + self.skipped_undecodable + self.skipped_malformed


@dataclass
class PreparedData:
    """Paths and facts the trainer needs from data preparation."""

    train_path: str
    val_path: str | None
    tokenizer_dir: str
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    stats: CorpusStats


def expand_files(specs: list[str]) -> list[Path]:
    """Resolve pkg:// specs and globs into an ordered, de-duplicated list of existing files."""
    files: list[Path] = []
    missing = []
    for spec in specs:
        path = resolve_data_path(spec)
        matches = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else ([path] if Path(path).exists() else [])
        if not matches:
            missing.append(spec)
        directories = [m for m in matches if Path(m).is_dir()]
        if directories:
            raise ValueError(
                f"data.train_files: {spec!r} matches director{'ies' if len(directories) > 1 else 'y'} {directories[:3]}; "
                f"name files, e.g. '{directories[0]}/*.txt'"
            )
        files.extend(Path(m) for m in matches if Path(m) not in files)
    if missing:
        raise FileNotFoundError(f"data.train_files: no file matches {missing}; check the paths (relative to the working dir)")
    return files


def _file_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "txt"


def iter_documents(files: list[Path], fmt: str, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """Yield non-empty UTF-8 documents, counting every row that is skipped and why."""
    for path in files:
        stats.files += 1
        kind = _file_format(path, fmt)
        if kind == "parquet":
            table_file = pq.ParquetFile(path)
            if text_field not in table_file.schema_arrow.names:
                raise ValueError(
                    f"{path}: no column '{text_field}' (columns: {table_file.schema_arrow.names}); set data.text_field"
                )
            for batch in table_file.iter_batches(columns=[text_field], batch_size=4096):
                for value in batch.column(0).to_pylist():
                    if isinstance(value, bytes):
                        try:
                            value = value.decode("utf-8")
                        except UnicodeDecodeError:
                            stats.skipped_undecodable += 1
                            continue
                    if not isinstance(value, str):
                        stats.skipped_malformed += 1
                        continue
                    if not value.strip():
                        stats.skipped_empty += 1
                        continue
                    stats.documents += 1
                    yield value
            continue
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skipped_undecodable += 1
                    continue
                if kind == "jsonl":
                    if not line.strip():
                        stats.skipped_empty += 1
                        continue
                    try:
                        record = json.loads(line)
                        text = record[text_field] if isinstance(record, dict) else None
                    except (json.JSONDecodeError, KeyError):
                        text = None
                    if not isinstance(text, str):
                        stats.skipped_malformed += 1
                        continue
                    line = text
                line = line.strip()
                if not line:
                    stats.skipped_empty += 1
                    continue
                stats.documents += 1
                yield line


def fingerprint(cfg: PretrainConfig, files: list[Path]) -> str:
    """Hash of everything that determines the prepared blocks."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": PREP_VERSION,
        "data": cfg.data.model_dump(mode="json", exclude={"prepared_dir", "train_files"}),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "model_source": [cfg.model.source, cfg.model.path],
        "seed": cfg.run.seed,
    }, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _is_validation(doc_index: int, seed: int, val_fraction: float) -> bool:
    # A per-document hash keeps the split stable however the corpus is streamed.
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def train_tokenizer(cfg: PretrainConfig, files: list[Path], out_dir: Path):
    """Train a byte-level BPE on the training documents (Chinese and English both work: no UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=[SPECIAL_TOKENS["eos_token"], SPECIAL_TOKENS["pad_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = CorpusStats()
    docs = (d for i, d in enumerate(itertools.islice(iter_documents(files, cfg.data.format, cfg.data.text_field, stats), cfg.data.max_documents))
            if not _is_validation(i, cfg.run.seed, cfg.data.val_fraction))
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos_token"],
        eos_token=SPECIAL_TOKENS["eos_token"],
        pad_token=SPECIAL_TOKENS["pad_token"],
        model_max_length=cfg.model.max_position_embeddings,
    )
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a local tokenizer directory (never from a hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)


def _model_tokenizer(cfg: PretrainConfig):
    """The tokenizer that belongs to a loaded model (hf_dir or gguf)."""
    from transformers import AutoTokenizer

    path = Path(resolve_data_path(cfg.model.path))
    if cfg.model.source == "gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)


class _BlockWriter:
    """Packs a token stream into fixed-length blocks and streams them to a Parquet file."""

    def __init__(self, path: Path, seq_len: int, rows_per_group: int = 2048):
        self.path, self.seq_len, self.rows_per_group = path, seq_len, rows_per_group
        self.buffer: list[int] = []
        self.pending: list[list[int]] = []
        self.blocks = 0
        self.writer = pq.ParquetWriter(path, BLOCK_SCHEMA)

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        while len(self.buffer) >= self.seq_len:
            self.pending.append(self.buffer[: self.seq_len])
            del self.buffer[: self.seq_len]
            if len(self.pending) >= self.rows_per_group:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        ids = list(range(self.blocks, self.blocks + len(self.pending)))
        self.writer.write_table(pa.table({"block_id": ids, "input_ids": self.pending}, schema=BLOCK_SCHEMA))
        self.blocks += len(self.pending)
        self.pending = []

    def close(self) -> int:
        self._flush()
        self.writer.close()
        return len(self.buffer)  # tokens that did not fill a last block


def _shuffle_parquet(path: Path, seed: int) -> None:
    """Shuffle block order once, at preparation time, so training reads a fixed random order."""
    table = pq.read_table(path)
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    pq.write_table(table.take(pa.array(order, pa.int64())), path, row_group_size=2048)


def prepare_data(cfg: PretrainConfig, log=print) -> PreparedData:
    """Tokenize and pack the corpus once; later calls with the same inputs reuse the result."""
    files = expand_files(cfg.data.train_files)
    key = fingerprint(cfg, files)
    out = cfg.data_dir / key
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        stats = CorpusStats(**manifest["stats"])
        log(f"[data] reusing prepared blocks in {out}")
        return PreparedData(**{**manifest["prepared"], "stats": stats})

    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(resolve_data_path(cfg.tokenizer.path))
    elif cfg.model.source != "scratch":
        tokenizer = _model_tokenizer(cfg)
    else:
        log(f"[data] training a byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size}) on {len(files)} file(s)")
        tokenizer = train_tokenizer(cfg, files, tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; documents cannot be separated when packing")

    stats = CorpusStats()
    train_path, val_path = out / "train.parquet", out / "val.parquet"
    writers = {"train": _BlockWriter(train_path, cfg.data.seq_len), "val": _BlockWriter(val_path, cfg.data.seq_len)}
    batch: list[tuple[str, str]] = []

    def flush_batch() -> None:
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (split, _), ids in zip(batch, encoded):
            writers[split].add(ids + [eos])
            setattr(stats, f"{split}_tokens", getattr(stats, f"{split}_tokens") + len(ids) + 1)
        batch.clear()

    docs = itertools.islice(iter_documents(files, cfg.data.format, cfg.data.text_field, stats), cfg.data.max_documents)
    for i, doc in enumerate(docs):
        split = "val" if _is_validation(i, cfg.run.seed, cfg.data.val_fraction) else "train"
        setattr(stats, f"{split}_documents", getattr(stats, f"{split}_documents") + 1)
        batch.append((split, doc))
        if len(batch) >= 1024:
            flush_batch()
    if batch:
        flush_batch()
    for split, writer in writers.items():
        stats.dropped_tail_tokens += writer.close()
        setattr(stats, f"{split}_blocks", writer.blocks)
    if stats.train_blocks == 0:
        raise ValueError(
            f"data: the corpus gave 0 training blocks of {cfg.data.seq_len} tokens "
            f"({stats.train_tokens} tokens from {stats.train_documents} documents); add text or lower data.seq_len"
        )
    _shuffle_parquet(train_path, cfg.run.seed)
    if stats.val_blocks == 0:
        if cfg.data.val_fraction > 0:
            stats.notes.append("validation split too small for one block: no validation loss")
        val_path.unlink()
    if stats.skipped:
        stats.notes.append(
            f"skipped {stats.skipped} row(s): {stats.skipped_empty} empty, {stats.skipped_undecodable} not UTF-8, "
            f"{stats.skipped_malformed} malformed"
        )

    prepared = PreparedData(
        train_path=str(train_path),
        val_path=str(val_path) if stats.val_blocks else None,
        tokenizer_dir=str(tokenizer_dir),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        stats=stats,
    )
    payload = {"prepared": {k: v for k, v in asdict(prepared).items() if k != "stats"}, "stats": asdict(stats)}
    # Written last: its presence means the directory is complete.
    manifest_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    log(
        f"[data] {stats.documents} documents -> {stats.train_blocks} train / {stats.val_blocks} val blocks of "
        f"{cfg.data.seq_len} tokens; skipped {stats.skipped} row(s) "
        f"(empty {stats.skipped_empty}, undecodable {stats.skipped_undecodable}, malformed {stats.skipped_malformed})"
    )
    return prepared
