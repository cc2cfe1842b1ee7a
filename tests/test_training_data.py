"""Data preparation: bad rows are counted, never fatal; blocks are packed, split and cached."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.config import validate_config
from training.data import prepare_data

ENGLISH = [
    "The quarterly report shows revenue growth in every region.",
    "Customers asked how to reset a password without email access.",
    "Shipping was fast and the package arrived in good condition.",
]
CHINESE = ["这本书写得很好，值得推荐。", "物流很快，包装也很好。", "客服回答问题非常耐心。"]


def make_config(tmp_path, files, **data):
    return validate_config({
        "data": {"train_files": [str(f) for f in files], "seq_len": 16, "val_fraction": 0.1, **data},
        "tokenizer": {"vocab_size": 400, "min_frequency": 1},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "data-test"},
    })


def test_empty_and_undecodable_lines_are_skipped_and_counted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = []
    for i in range(60):
        lines.append((ENGLISH[i % 3] + " " + CHINESE[i % 3]).encode())
        if i % 10 == 0:
            lines.append(b"")            # empty
            lines.append(b"   \t ")      # whitespace only
        if i % 15 == 0:
            lines.append(b"caf\xe9 \xff\xfe broken latin-1 bytes")  # not UTF-8
    corpus.write_bytes(b"\n".join(lines) + b"\n")

    prepared = prepare_data(make_config(tmp_path, [corpus]), log=lambda *_: None)
    stats = prepared.stats
    assert stats.documents == 60
    assert stats.skipped_empty == 12
    assert stats.skipped_undecodable == 4
    assert stats.train_documents + stats.val_documents == 60
    assert any("skipped 16 row(s)" in note for note in stats.notes)

    table = pq.read_table(prepared.train_path)
    assert table.num_rows == stats.train_blocks > 0
    assert all(len(ids) == 16 for ids in table.column("input_ids").to_pylist())
    assert sorted(table.column("block_id").to_pylist()) == list(range(table.num_rows))


def test_byte_level_tokenizer_round_trips_chinese_and_english(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "mixed.txt"
    corpus.write_text("\n".join((ENGLISH + CHINESE) * 20), encoding="utf-8")
    prepared = prepare_data(make_config(tmp_path, [corpus]), log=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir, local_files_only=True)
    for text in ENGLISH + CHINESE + ["未见过的字：龘", "emoji 🚀"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_jsonl_and_parquet_inputs_with_malformed_rows(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    rows = [json.dumps({"text": t}) for t in ENGLISH * 10] + ["{not json", json.dumps({"body": "no text field"}),
                                                              json.dumps({"text": 5})]
    jsonl.write_text("\n".join(rows) + "\n", encoding="utf-8")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": CHINESE * 10 + [None, ""]}), parquet)

    prepared = prepare_data(make_config(tmp_path, [jsonl, parquet]), log=lambda *_: None)
    stats = prepared.stats
    assert stats.files == 2
    assert stats.documents == 60
    assert stats.skipped_malformed == 4  # bad JSON, missing key, non-string text, null
    assert stats.skipped_empty == 1


def test_preparation_is_cached_and_deterministic(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(ENGLISH * 30), encoding="utf-8")
    cfg = make_config(tmp_path, [corpus])
    first = prepare_data(cfg, log=lambda *_: None)
    messages = []
    second = prepare_data(cfg, log=messages.append)
    assert second.train_path == first.train_path
    assert any("reusing" in m for m in messages)


def test_missing_files_and_tiny_corpus_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prepare_data(make_config(tmp_path, [tmp_path / "nope.txt"]))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match="0 training blocks"):
        prepare_data(make_config(tmp_path, [tiny], seq_len=512))
