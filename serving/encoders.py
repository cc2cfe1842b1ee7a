"""Sequence classification and NER (BIO token classification) on an encoder export, batched with padding."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

from serving.export_format import ModelExport, doubled_input, ner_copy_max_len
from serving.generation import quantize_linear_int8


@dataclass(frozen=True)
class Entity:
    """A named entity as a character span of the input text."""

    entity: str
    start: int
    end: int
    text: str
    score: float


class EncoderEngine:
    """Runs a classification or NER export on lists of texts (one padded forward pass per batch)."""

    def __init__(
        self,
        export: ModelExport,
        *,
        quantize_int8: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

        self.export = export
        self.labels = export.manifest.labels
        self.device = torch.device(device)
        model_cls = (
            AutoModelForSequenceClassification
            if export.task == "sequence-classification"
            else AutoModelForTokenClassification
        )
        # Two tokenizer instances: a fast tokenizer keeps padding/truncation as state on its Rust
        # object and `_encode` (model thread) sets them for every batch; counting tokens for the length
        # limit (admission threads, concurrently) on the same object could see a truncated count and
        # let an over-long text through. The counting one is only ever called without either.
        self.tokenizer = AutoTokenizer.from_pretrained(export.path, trust_remote_code=trust_remote_code)
        self._count_tokenizer = AutoTokenizer.from_pretrained(export.path, trust_remote_code=trust_remote_code)
        self.model = model_cls.from_pretrained(
            export.path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
        ).to(self.device)
        self.model.eval()
        if quantize_int8:
            self.model = quantize_linear_int8(self.model)
        self.max_seq_len = export.manifest.max_seq_len
        # A doubled NER input holds the text twice: each copy gets what lets both fit (as in training).
        self.ner_input = export.manifest.ner_input if export.task == "token-classification" else "single"
        self.max_text_tokens = ner_copy_max_len(self.max_seq_len, self.ner_input)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` with special tokens, never truncated; safe to call from any thread."""
        encoded = self._count_tokenizer(text, add_special_tokens=True, truncation=False, padding=False)
        return len(encoded["input_ids"])

    def _encode(self, texts: list[str], offsets: bool = False):
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_len,
            return_tensors="pt",
            return_offsets_mapping=offsets,
        )

    def _encode_doubled(self, texts: list[str]) -> tuple[dict, list[list[tuple[int, int]]], list[int]]:
        """Model inputs 'text <sep> text' (doubled_input, right-padded as in training), the character offsets
        of each text's tokens, and where each text's second copy starts."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_text_tokens, return_offsets_mapping=True)
        separator = self.export.manifest.ner_separator_token_id
        rows = [doubled_input(ids, separator) for ids in encoded["input_ids"]]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else separator
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        starts = [len(ids) + 1 for ids in encoded["input_ids"]]
        return {"input_ids": input_ids, "attention_mask": mask}, encoded["offset_mapping"], starts

    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """Label probabilities per text, in label order."""
        encoded = self._encode(texts)
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()}).logits.float()
        probs = torch.softmax(logits, dim=-1).tolist()
        return [dict(zip(self.labels, row)) for row in probs]

    def ner(self, texts: list[str]) -> list[list[Entity]]:
        """Entities per text, with character offsets into that text.

        A 'doubled' export reads each text as 'text <sep> text' and takes the predictions of the second copy,
        whose token j has the offsets of the text's token j."""
        if self.ner_input == "doubled":
            encoded, offsets, starts = self._encode_doubled(texts)
        else:
            encoded = self._encode(texts, offsets=True)
            offsets = encoded.pop("offset_mapping").tolist()
            starts = [0] * len(texts)
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()}).logits.float()
        probs = torch.softmax(logits, dim=-1)
        scores, tag_ids = probs.max(dim=-1)
        results = []
        for i, text in enumerate(texts):
            at = slice(starts[i], starts[i] + len(offsets[i]))
            tokens = [
                (self.labels[tag], start, end, score)
                for tag, (start, end), score, attended in zip(
                    tag_ids[i, at].tolist(), offsets[i], scores[i, at].tolist(), encoded["attention_mask"][i, at].tolist()
                )
                if attended and end > start  # special and padding tokens have empty offsets
            ]
            if self.export.manifest.ner_tag_subtoken == "last":
                tokens = words_read_at_last_subtoken(text, tokens)
            results.append(bio_spans(text, tokens))
        return results

    def check_health(self) -> None:
        """One forward pass on a short text: raises if the model cannot answer."""
        encoded = self._encode(["ok"])
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()}).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("model produced non-finite logits")


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")  # CJK characters, kana, hangul, full-width forms


def words_read_at_last_subtoken(text: str, tagged_tokens: list[tuple[str, int, int, float]]) -> list[tuple[str, int, int, float]]:
    """(tag, start, end, score) per word, each word tagged by its last sub-token, as a causal export is trained
    (manifest ner_tag_subtoken "last": its earlier sub-tokens had no label).

    Words of raw text: the byte-level pieces of one character (same offsets), and adjacent pieces of a run of
    letters or digits, form one word; every wide (CJK) character is a word of its own, as in character-level
    Chinese NER data; whitespace-only pieces belong to no word."""
    words: list[tuple[str, int, int, float]] = []
    for tag, start, end, score in tagged_tokens:
        while start < end and text[start].isspace():  # byte-level pieces carry the space before a word
            start += 1
        if start >= end:
            continue
        if words:
            _, w_start, w_end, _ = words[-1]
            same_char = start < w_end
            same_run = (start == w_end and text[start - 1].isalnum() and text[start].isalnum()
                        and not _wide(text[start - 1]) and not _wide(text[start]))
            if same_char or same_run:
                words[-1] = (tag, w_start, max(end, w_end), score)
                continue
        words.append((tag, start, end, score))
    return words


def bio_spans(text: str, tagged_tokens: list[tuple[str, int, int, float]]) -> list[Entity]:
    """Merge (BIO tag, start, end, score) tokens into entity spans.

    B-X starts an entity; I-X continues an open X entity (or starts one, if none is open, as most
    taggers do for a stray I-); O or another type closes it. The score is the mean token score.
    """
    entities: list[Entity] = []
    current: tuple[str, int, int, list[float]] | None = None

    def close():
        if current is not None:
            kind, start, end, scores = current
            entities.append(Entity(kind, start, end, text[start:end], sum(scores) / len(scores)))

    for tag, start, end, score in tagged_tokens:
        prefix, _, kind = tag.partition("-")
        if tag == "O" or not kind:
            close()
            current = None
        elif prefix == "I" and current is not None and current[0] == kind:
            current = (kind, current[1], end, current[3] + [score])
        else:
            close()
            current = (kind, start, end, [score])
    close()
    return entities
