"""Records -> token ids and labels for fine-tuning (public through training.finetune_data).

Takes a transformers *fast* tokenizer (offsets are needed to find the assistant turns and the words);
never imports torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence

from serving.export_format import doubled_input, ner_copy_max_len
from training.finetune_data import FALLBACK_CHATML, IGNORE_INDEX, DataError, TaskDataStats

NER_TAG_SUBTOKENS = ("first", "last")  # which sub-token of a word carries its tag (see encode_ner)


def _render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn's span is what rendering that turn adds after the prompt that serving would render for it
    (the conversation so far + the generation prompt), so the labels are exactly what the model has to
    generate at inference: the content and the template's end-of-turn marker."""
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], template, False)
        prompt = _render(tokenizer, messages[:i], template, True) if i else _text_before_first_reply(upto, message)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                "the chat template does not render a conversation as its prompt followed by the reply (it rewrites "
                "earlier turns), so the response tokens cannot be located; set data.chat_template to a template "
                "that appends turns (e.g. ChatML)"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def _text_before_first_reply(rendered: str, message: dict) -> str:
    """What a template renders before a conversation's opening assistant turn.

    There is no earlier turn to render as the prompt, yet a template may still put text there (SmolLM2's
    inserts a default system prompt, then the assistant header): that text is context, never a label, so
    the labelled span starts where the reply's content does."""
    content = message.get("content")
    at = rendered.find(content) if isinstance(content, str) and content else -1
    return rendered[:at] if at > 0 else ""


def encode_sft(
    tokenizer,
    messages: list[dict],
    *,
    max_len: int,
    chat_template: str | None = None,
    stats: TaskDataStats | None = None,
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation; labels are IGNORE_INDEX except on assistant turns.

    Rendered with `chat_template`, else the tokenizer's own template, else FALLBACK_CHATML (as serving).
    Each assistant turn is labelled up to and including its first eos token; a turn whose template does
    not emit eos gets one appended (labelled), so every turn teaches the model to stop. Longer than max_len:
    cut at max_len if a labelled token remains (stats.truncated), else None (stats.skipped_too_long)."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or FALLBACK_CHATML
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set one (tokenizer.eos_token) so turns can end")
    text, spans = _assistant_spans(tokenizer, messages, template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]

    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in spans:
        # Tokens before the turn (prompt, template markers): context only.
        while position < len(token_ids) and offsets[position][0] < start:
            input_ids.append(token_ids[position])
            labels.append(IGNORE_INDEX)
            position += 1
        ended = False
        while position < len(token_ids) and offsets[position][0] < end:
            token = token_ids[position]
            input_ids.append(token)
            # After the turn's eos, the template's trailing characters (a newline) are context.
            labels.append(IGNORE_INDEX if ended else token)
            ended = ended or token == eos
            position += 1
        if not ended:
            input_ids.append(eos)
            labels.append(eos)
    input_ids.extend(token_ids[position:])
    labels.extend([IGNORE_INDEX] * (len(token_ids) - position))

    if len(input_ids) > max_len:
        if all(label == IGNORE_INDEX for label in labels[:max_len]):
            if stats is not None:
                stats.skipped_too_long += 1
            return None
        input_ids, labels = input_ids[:max_len], labels[:max_len]
        if stats is not None:
            stats.truncated += 1
    return input_ids, labels


def encode_classification(tokenizer, text: str, *, max_len: int, stats: TaskDataStats | None = None) -> list[int]:
    """Token ids with the tokenizer's special tokens, truncated to max_len (counted in stats.truncated)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_len:
        return ids
    if stats is not None:
        stats.truncated += 1
    return tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]


def _continuation(tag: str) -> str:
    """The label of a word's later sub-tokens: inside the same entity."""
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def encode_ner(
    tokenizer,
    words: list[str],
    tags: list[str],
    label2id: Mapping[str, int],
    *,
    max_len: int,
    word_joiner: str | None = None,
    tag_subtoken: str = "first",
    separator_token_id: int | None = None,
    stats: TaskDataStats | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, word_ids) for BIO-tagged words.

    With separator_token_id (ner_input 'doubled'), the input is the sentence's encoding, the separator, and the
    same encoding again (serving.export_format.doubled_input): labels and word ids sit on the second copy only
    (IGNORE_INDEX / -1 on the first copy and the separator), so a causal model tags each token having seen the
    whole sentence. Each copy is truncated to ner_copy_max_len(max_len, 'doubled') tokens, so both fit.

    tag_subtoken says which sub-token of a word carries the word's tag (ner_tag_subtoken picks it per base):
    - "first" (bidirectional encoders): every non-special sub-token is labelled, as serving reads every
      one back: the first with its word's tag, later ones of a B-X word with I-X.
    - "last" (causal decoders): a causal model has seen the whole word only at its last sub-token (at the
      first byte of a Chinese character it cannot know which character follows), so the last sub-token
      carries the word's tag and the earlier ones get IGNORE_INDEX (no loss, never read back).
    Special tokens get IGNORE_INDEX and word id -1. With word_joiner=None the words are tokenized as
    pre-split words; with a string (" " for English, "" for Chinese) the joined text is tokenized and tokens
    are mapped to words by character offset, which matches how serving tokenizes raw text with byte-level
    BPE tokenizers."""
    if separator_token_id is None:
        return _encode_ner_once(tokenizer, words, tags, label2id, max_len=max_len, word_joiner=word_joiner,
                                tag_subtoken=tag_subtoken, stats=stats)
    ids, labels, word_of = _encode_ner_once(tokenizer, words, tags, label2id,
                                            max_len=ner_copy_max_len(max_len, "doubled"), word_joiner=word_joiner,
                                            tag_subtoken=tag_subtoken, stats=stats)
    first_copy = len(ids) + 1  # the first copy and the separator: context only
    return (doubled_input(ids, separator_token_id), [IGNORE_INDEX] * first_copy + labels,
            [-1] * first_copy + word_of)


def _encode_ner_once(tokenizer, words, tags, label2id, *, max_len, word_joiner, tag_subtoken, stats):
    """encode_ner of one copy of the sentence."""
    if tag_subtoken not in NER_TAG_SUBTOKENS:
        raise ValueError(f"tag_subtoken {tag_subtoken!r}: use one of {', '.join(NER_TAG_SUBTOKENS)}")
    missing = sorted({t for t in tags} - set(label2id) | {_continuation(t) for t in tags} - set(label2id))
    if missing:
        raise DataError(f"tags {missing} are not in the label set {list(label2id)}; build labels with ner_label_list")
    if word_joiner is None:
        encoded = tokenizer(words, is_split_into_words=True, add_special_tokens=True)
        word_of = [(-1 if w is None else w) for w in encoded.word_ids()]
        input_ids = encoded["input_ids"]
    else:
        starts, pos = [], 0
        for word in words:
            starts.append(pos)
            pos += len(word) + len(word_joiner)
        text = word_joiner.join(words)
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
        input_ids = encoded["input_ids"]
        special = [bool(s) or end <= begin for s, (begin, end) in zip(encoded["special_tokens_mask"], encoded["offset_mapping"])]
        word_of = []
        for is_special, (begin, end) in zip(special, encoded["offset_mapping"]):
            if is_special:
                word_of.append(-1)
                continue
            if tag_subtoken == "last" and not text[begin:end].strip():
                word_of.append(-1)  # a lone space token is no word's last sub-token (serving skips it too)
                continue
            while begin < end - 1 and text[begin].isspace():  # byte-level tokens carry the space before a word
                begin += 1
            word_of.append(max(bisect.bisect_right(starts, begin) - 1, 0))
    if len(input_ids) > max_len:
        if stats is not None:
            stats.truncated += 1
        # Keep a trailing special token (e.g. [SEP]) the way the tokenizer's own truncation would.
        tail = 1 if word_of and word_of[-1] == -1 else 0
        keep = max_len - tail
        input_ids = input_ids[:keep] + input_ids[len(input_ids) - tail :]
        word_of = word_of[:keep] + word_of[len(word_of) - tail :]
    # Labelled after truncation, so a word cut short is labelled (and read back) on what remains of it.
    labels, previous = [], -1
    for i, w in enumerate(word_of):
        if w == -1:  # special tokens
            labels.append(IGNORE_INDEX)
        elif tag_subtoken == "last":
            last_of_word = i + 1 == len(word_of) or word_of[i + 1] != w
            labels.append(label2id[tags[w]] if last_of_word else IGNORE_INDEX)
        else:
            labels.append(label2id[tags[w] if w != previous else _continuation(tags[w])])
        previous = w
    return input_ids, labels, word_of


def word_tags_from_subtokens(
    pred_label_ids: Sequence[int],
    word_ids: Sequence[int],
    id2label: Mapping[int, str] | Sequence[str],
    num_words: int | None = None,
    tag_subtoken: str = "first",
) -> list[str]:
    """Word-level tags from per-sub-token predictions: each word takes the tag of the sub-token that
    encode_ner labelled with it (tag_subtoken: its first, or for causal decoders its last).

    Words with no sub-token (cut by truncation) get 'O'; pass num_words to get one tag per input word.
    A word cut by truncation after some of its sub-tokens is read from its last remaining one."""
    if tag_subtoken not in NER_TAG_SUBTOKENS:
        raise ValueError(f"tag_subtoken {tag_subtoken!r}: use one of {', '.join(NER_TAG_SUBTOKENS)}")
    count = num_words if num_words is not None else max((w for w in word_ids if w >= 0), default=-1) + 1
    tags = ["O"] * count
    seen: set[int] = set()
    for label_id, w in zip(pred_label_ids, word_ids):
        if w < 0 or w >= count or label_id < 0 or (w in seen and tag_subtoken == "first"):
            continue  # label_id < 0: IGNORE_INDEX in gold labels (a causal word's earlier sub-tokens)
        seen.add(w)
        tags[w] = id2label[int(label_id)]  # "last": later sub-tokens of the word overwrite
    return tags


def ner_tag_subtoken(model_type: str) -> str:
    """Which sub-token of a word carries its NER tag for a base of this model_type: "first" for the
    bidirectional encoders (those with a masked-LM head in transformers: BERT, RoBERTa, DeBERTa, ...),
    "last" for everything else (causal decoders: Llama, SmolLM2, Qwen, GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "first" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def resolve_ner_input(setting: str, tag_subtoken: str) -> str:
    """data.ner_input for a base: 'auto' is 'doubled' for causal decoders (words tagged at their last sub-token,
    which see no right context otherwise) and 'single' for bidirectional encoders."""
    if setting == "auto":
        return "doubled" if tag_subtoken == "last" else "single"
    return setting


def ner_separator(tokenizer) -> int:
    """The token between the two copies of a doubled NER input: the base's eos (else its sep) token."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise DataError("data.ner_input: doubled needs an eos or sep token in the tokenizer to separate the two copies; "
                    "set data.ner_input: single")


def pack_sft(examples: Iterable[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate consecutive (input_ids, labels) examples into rows of at most seq_len tokens, in order.

    An example that does not fit the open row starts a new one; one longer than seq_len is split. Each
    example starts with prompt tokens (IGNORE_INDEX), so no loss is taken across an example boundary."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > seq_len:
            rows.append((ids, labels))
            ids, labels = [], []
        for start in range(0, len(ex_ids), seq_len):
            chunk_ids, chunk_labels = ex_ids[start : start + seq_len], ex_labels[start : start + seq_len]
            if ids and len(ids) + len(chunk_ids) > seq_len:
                rows.append((ids, labels))
                ids, labels = [], []
            ids, labels = ids + list(chunk_ids), labels + list(chunk_labels)
    if ids:
        rows.append((ids, labels))
    return rows
