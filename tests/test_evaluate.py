"""`python -m training.evaluate` on tiny exports (real transformers), checked against independent computations."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving.tiny_exports import NER_LABELS, SENTIMENT_LABELS, build_causal_lm_export, build_encoder_export
from training import evaluate
from training.finetune_data import encode_sft
from training.task_metrics import classification_metrics, confusion_matrix, ner_counts, ner_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "causal": build_causal_lm_export(root / "causal-lm"),
        "classifier": build_encoder_export(root / "classifier", "sequence-classification", SENTIMENT_LABELS),
        "ner": build_encoder_export(root / "ner", "token-classification", NER_LABELS),
    }


def run(argv, tmp_path):
    out = tmp_path / "result.json"
    args = evaluate.parse_args([*argv, "--out", str(out)])
    return evaluate.evaluate(args, log=lambda *_: None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_perplexity_equals_the_models_own_loss_on_response_tokens(exports, tmp_path):
    rows = [{"prompt": "What is a list?", "response": "A mutable sequence."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
            {"prompt": "Say nothing", "response": "   "}]  # an empty response: a counted skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run(["--export", str(exports["causal"]), "--data", str(data), "--batch-size", "2"], tmp_path)
    assert result["task"] == "sft" and result["rows"] == 2 and result["stats"]["skipped_empty"] == 1

    # Independently: transformers' own loss (mean over labelled tokens) per example, one at a time.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exports["causal"]).eval()
    tok = AutoTokenizer.from_pretrained(exports["causal"])
    total = count = 0
    for messages in ([{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["response"]}],
                     rows[1]["messages"]):
        ids, labels = encode_sft(tok, messages, max_len=256)
        n = sum(l != -100 for l in labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        total, count = total + loss * n, count + n
    assert result["metrics"]["tokens"] == count
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_classification_matches_serving_predictions_and_counts_unknown_labels(exports, tmp_path):
    from serving.encoders import EncoderEngine
    from serving.export_format import read_export

    texts = ["The product is great", "terrible quality, broke in a day", "it works", "质量很好", "一般般吧", "not bad at all"]
    gold = ["positive", "negative", "neutral", "positive", "neutral", "negative"]
    csv = tmp_path / "val.csv"
    csv.write_text("sentence,sentiment\n" + "".join(f"\"{t}\",{g}\n" for t, g in zip(texts, gold)) + "extra row,angry\n",
                   encoding="utf-8")
    result = run(["--export", str(exports["classifier"]), "--data", str(csv), "--text-field", "sentence",
                  "--label-field", "sentiment", "--batch-size", "4"], tmp_path)
    assert result["stats"]["unknown_labels"] == 1 and result["rows"] == 7

    engine = EncoderEngine(read_export(exports["classifier"]))
    probs = engine.classify(texts)
    preds = [SENTIMENT_LABELS.index(max(p, key=p.get)) for p in probs]
    expected = classification_metrics(confusion_matrix([SENTIMENT_LABELS.index(g) for g in gold], preds, 3))
    assert result["metrics"] == pytest.approx(expected)
    assert sum(map(sum, result["confusion"])) == 6


def test_ner_scores_its_own_predictions_perfectly_and_a_changed_gold_by_hand(exports, tmp_path):
    sentences = [["张", "三", "在", "北", "京", "工", "作"], ["Guido", "van", "Rossum", "wrote", "Python", "in", "Amsterdam"],
                 ["李", "四", "去", "上", "海"]]
    # Gold = the model's own word-level predictions, so the metrics are known exactly: all correct.
    from training.finetune_data import encode_ner, word_tags_from_subtokens
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports["ner"])
    model = AutoModelForTokenClassification.from_pretrained(exports["ner"]).eval()
    own = []
    for words in sentences:
        ids, _, word_ids = encode_ner(tok, words, ["O"] * len(words), {"O": 0}, max_len=128)
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        own.append(word_tags_from_subtokens(pred, word_ids, NER_LABELS, num_words=len(words)))
    n_entities = sum(ner_counts(t, t)[2] for t in own)
    assert n_entities > 0  # a random model still tags something
    conll = tmp_path / "val.conll"
    conll.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in zip(sentences, own)),
                     encoding="utf-8")
    perfect = run(["--export", str(exports["ner"]), "--data", str(conll), "--batch-size", "2"], tmp_path)
    assert perfect["metrics"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert perfect["entities"] == {"correct": n_entities, "predicted": n_entities, "gold": n_entities}

    # Gold with every tag O plus one added entity of a type the export does not know: 0 correct.
    changed = [["O"] * len(ws) for ws in sentences]
    changed[0][0] = "B-MISC"
    conll.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in zip(sentences, changed)),
                     encoding="utf-8")
    result = run(["--export", str(exports["ner"]), "--data", str(conll)], tmp_path)
    assert result["entities"] == {"correct": 0, "predicted": n_entities, "gold": 1}
    assert result["metrics"] == ner_metrics(0, n_entities, 1)
    assert any("MISC" in note for note in result["stats"]["notes"])


def test_label_likelihood_zero_and_k_shot_on_a_causal_lm(exports, tmp_path):
    rows = [("great product", "pos"), ("awful, broke", "neg"), ("works well", "pos"), ("waste of money", "neg")]
    data = tmp_path / "val.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    shots = tmp_path / "train.tsv"
    shots.write_text("text\tlabel\n" + "".join(f"{t} indeed\t{l}\n" for t, l in rows * 2), encoding="utf-8")
    result = run(["--export", str(exports["causal"]), "--data", str(data), "--task", "classification",
                  "--shots-from", str(shots), "--shots", "3", "--verbalizers", "pos=good,neg=bad"], tmp_path)
    assert result["labels"] == ["neg", "pos"] and result["verbalizers"] == {"neg": " bad", "pos": " good"}
    assert len(result["shots"]) == 3 and {l for _, l in result["shots"]} == {"neg", "pos"}
    assert {"zero_shot_accuracy", "zero_shot_macro_f1", "3_shot_accuracy", "3_shot_macro_f1"} <= set(result["metrics"])

    # The scores are log p(label words | prompt) computed by one full forward pass per sequence.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exports["causal"]).eval()
    tok = AutoTokenizer.from_pretrained(exports["causal"])
    prompt = evaluate.build_prompt(evaluate.DEFAULT_PROMPT, "great product", [], result["verbalizers"])
    scores = evaluate.label_log_likelihoods(model, tok, [prompt], [" bad", " good"], batch_size=2, max_len=256)[0]
    for words, score in zip([" bad", " good"], scores):
        p_ids, l_ids = tok(prompt, add_special_tokens=False)["input_ids"], tok(words, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + l_ids])).logits[0], -1)
        expected = sum(logp[len(p_ids) + i - 1, t].item() for i, t in enumerate(l_ids))
        assert score == pytest.approx(expected, abs=1e-4)
    gold = [0 if l == "neg" else 1 for _, l in rows]
    prompts = [evaluate.build_prompt(evaluate.DEFAULT_PROMPT, t, [], result["verbalizers"]) for t, _ in rows]
    preds = [max((0, 1), key=s.__getitem__) for s in evaluate.label_log_likelihoods(model, tok, prompts, [" bad", " good"], 3, 256)]
    assert result["metrics"]["zero_shot_accuracy"] == classification_metrics(confusion_matrix(gold, preds, 2))["accuracy"]


def test_cli_prints_a_table_writes_json_and_reports_bad_input(exports, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nPython lists are mutable sequences.\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    env_cmd = [sys.executable, "-m", "training.evaluate", "--export", str(exports["causal"]), "--data", str(text),
               "--task", "causal-lm", "--out", str(out)]
    proc = subprocess.run(env_cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rows"] == 2 and result["stats"]["skipped_empty"] == 1 and result["metrics"]["perplexity"] > 1
    assert "perplexity" in proc.stdout and f"results: {out}" in proc.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\nok,1\n", encoding="utf-8")
    # Bad input: exit status 2 and the reader's message (in-process: one subprocess is enough).
    status = evaluate.main(["--export", str(exports["classifier"]), "--data", str(bad), "--out", str(tmp_path / "x.json")])
    assert status == 2 and not (tmp_path / "x.json").exists()
    assert "bad.csv:1: the header row ['review', 'stars'] has no column ['text', 'label']" in capsys.readouterr().err
    with pytest.raises(evaluate.DataError, match="a sequence-classification export evaluates classification"):
        evaluate.resolve_task("sft", "sequence-classification")


# ---- NER on a causal decoder (issue 7: SmolLM2 + LoRA scored entity F1 0.01 against a 0.50 baseline) ----
CAUSAL_NER_LABELS = ["O", "B-LOC", "I-LOC"]


def tiny_causal_token_classifier(tokenizer, labels, seed=0):
    """A 2-layer, hidden-64 Llama with a token-classification head, built from config."""
    from transformers import LlamaConfig, LlamaForTokenClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForTokenClassification(config)


def causal_ner_export(tmp_path, seed=3, ner_input="single"):
    """A tiny causal token-classification export whose raylm.json says ner_tag_subtoken=last (as training writes),
    reading its input once or doubled ('text <eos> text')."""
    from serving.tiny_exports import _manifest, build_bpe_tokenizer

    tok = build_bpe_tokenizer()
    export = tmp_path / "causal-ner"
    tiny_causal_token_classifier(tok, CAUSAL_NER_LABELS, seed=seed).save_pretrained(export, safe_serialization=True)
    tok.save_pretrained(export)
    manifest = {**_manifest("token-classification", "tiny-llama-ner", 64, CAUSAL_NER_LABELS), "ner_tag_subtoken": "last"}
    if ner_input == "doubled":
        manifest.update(ner_input="doubled", ner_separator_token_id=tok.eos_token_id)
    (export / "raylm.json").write_text(json.dumps(manifest))
    return export, manifest


def characters_sharing_their_first_subtoken(tokenizer, candidates="湛江汉湖提指求据清持息"):
    """Chinese characters that a byte-level BPE splits into several sub-tokens, all with the same first one."""
    by_first: dict[int, list[str]] = {}
    for ch in candidates:
        ids = tokenizer([ch], is_split_into_words=True)["input_ids"]
        if len(ids) > 1:
            by_first.setdefault(ids[0], []).append(ch)
    return max(by_first.values(), key=len)


@pytest.mark.parametrize("tag_subtoken,min_f1,max_f1", [("first", 0.0, 0.3), ("last", 0.95, 1.0)])
def test_a_causal_ner_model_learns_only_when_words_are_tagged_at_their_last_subtoken(tag_subtoken, min_f1, max_f1):
    """At the first byte-level piece of a Chinese character a causal model cannot know which character it
    is (the piece is shared by thousands), so tagging and reading words there learns nothing; at the last
    piece it has seen the whole character. Trained in-process, same data, same seed: only the tagging differs."""
    import random

    from serving.tiny_exports import build_bpe_tokenizer
    from training.finetune_data import encode_ner, ner_label_list, word_tags_from_subtokens

    tok = build_bpe_tokenizer()
    chars = characters_sharing_their_first_subtoken(tok)
    assert len(chars) >= 6
    places = set(chars[:3])  # single-character LOC entities among look-alike characters
    rng = random.Random(0)

    def sentence():
        words = [rng.choice(chars) for _ in range(8)]
        return words, ["B-LOC" if w in places else "O" for w in words]

    train, test = [sentence() for _ in range(512)], [sentence() for _ in range(64)]
    labels = ner_label_list(t for _, tags in train for t in tags)
    assert labels == CAUSAL_NER_LABELS
    label2id = {l: i for i, l in enumerate(labels)}
    model = tiny_causal_token_classifier(tok, labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoded = [encode_ner(tok, w, t, label2id, max_len=64, tag_subtoken=tag_subtoken) for w, t in train]
    for step in range(150):
        batch = encoded[(step * 16) % len(encoded):][:16]
        loss = model(input_ids=torch.tensor([e[0] for e in batch]), labels=torch.tensor([e[1] for e in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    totals = [0, 0, 0]
    for words, gold in test:
        ids, _, word_ids = encode_ner(tok, words, ["O"] * len(words), label2id, max_len=64, tag_subtoken=tag_subtoken)
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
        tags = word_tags_from_subtokens(pred, word_ids, labels, num_words=len(words), tag_subtoken=tag_subtoken)
        totals = [a + b for a, b in zip(totals, ner_counts(gold, tags))]
    assert totals[2] > 100
    assert min_f1 <= ner_metrics(*totals)["f1"] <= max_f1, (tag_subtoken, totals)


def test_ner_evaluation_reads_a_causal_export_where_its_manifest_says(tmp_path):
    """An export whose raylm.json says ner_tag_subtoken=last is scored at each word's last sub-token: gold equal
    to the model's own last-sub-token tags scores 1.0; read at the first sub-token the same gold does not."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from serving.export_format import read_export
    from training.finetune_data import encode_ner, word_tags_from_subtokens

    export, manifest = causal_ner_export(tmp_path)
    tok, model = AutoTokenizer.from_pretrained(export), AutoModelForTokenClassification.from_pretrained(export).eval()
    assert read_export(export).manifest.ner_tag_subtoken == "last"

    sentences = [list("湛江市惠珍联合医院"), list("邱县不沿海不通铁路"), list("北京上海天津湖北")]
    own = {}
    for reading in ("first", "last"):
        own[reading] = []
        for words in sentences:
            ids, _, word_ids = encode_ner(tok, words, ["O"] * len(words), {"O": 0}, max_len=64)
            with torch.no_grad():
                pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            own[reading].append(word_tags_from_subtokens(pred, word_ids, CAUSAL_NER_LABELS, num_words=len(words),
                                                         tag_subtoken=reading))
    assert own["first"] != own["last"]
    n_entities = sum(ner_counts(t, t)[2] for t in own["last"])
    assert n_entities > 0  # a random model still tags something
    conll = tmp_path / "val.conll"
    conll.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts)) + "\n" for ws, ts in zip(sentences, own["last"])),
                     encoding="utf-8")
    result = run(["--export", str(export), "--data", str(conll)], tmp_path)
    assert result["metrics"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    manifest["ner_tag_subtoken"] = "first"  # the same model read at the first sub-token: not its own tags
    (export / "raylm.json").write_text(json.dumps(manifest))
    assert run(["--export", str(export), "--data", str(conll)], tmp_path)["metrics"]["f1"] < 1.0


@pytest.mark.parametrize("ner_input", ["single", "doubled"])
@pytest.mark.parametrize("text,joiner", [("湛江市惠珍联合医院院长梁惠珍", ""), ("邱县不沿海，北京上海天津", ""),
                                         ("John Smithsonian visited Beijing city", " ")])
def test_serving_reads_a_causal_export_as_training_labels_it(tmp_path, text, joiner, ner_input):
    """Serving's entities (character spans of raw text) from a causal NER export equal the entity spans
    training.evaluate reads from the same model at each word's last sub-token (words: CJK characters, or
    space-separated words), so what is served is what was trained and scored; a doubled export is read on
    the second copy of 'text <eos> text' by both, and its offsets map back into the text."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from serving.encoders import EncoderEngine
    from serving.export_format import read_export
    from training.finetune_data import encode_ner, word_tags_from_subtokens
    from training.task_metrics import entity_spans

    export, _ = causal_ner_export(tmp_path, seed=5, ner_input=ner_input)
    tok, model = AutoTokenizer.from_pretrained(export), AutoModelForTokenClassification.from_pretrained(export).eval()
    words = text.split(" ") if joiner else list(text)
    separator = tok.eos_token_id if ner_input == "doubled" else None
    ids, _, word_ids = encode_ner(tok, words, ["O"] * len(words), {"O": 0}, max_len=64, word_joiner=joiner,
                                  tag_subtoken="last", separator_token_id=separator)
    with torch.no_grad():
        pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
    tags = word_tags_from_subtokens(pred, word_ids, CAUSAL_NER_LABELS, num_words=len(words), tag_subtoken="last")
    starts = [sum(len(w) + len(joiner) for w in words[:i]) for i in range(len(words))]
    want = {(kind, starts[a], starts[b - 1] + len(words[b - 1])) for kind, a, b in entity_spans(tags)}
    assert want  # a random model still tags something

    engine = EncoderEngine(read_export(export))
    served = engine.ner([text])[0]
    assert {(e.entity, e.start, e.end) for e in served} == want
    assert all(e.text == text[e.start:e.end] for e in served)
    # In a padded batch beside a longer text, the same answer (padding never shifts the second copy).
    assert engine.ner(["北京上海天津湖北湛江市惠珍联合医院院长梁惠珍邱县不沿海", text])[1] == served
    if ner_input == "doubled":
        assert engine.max_text_tokens == (64 - 1) // 2  # both copies and the separator fit max_seq_len


def test_ner_evaluation_reads_a_doubled_export_on_the_second_copy(tmp_path):
    """An export whose raylm.json says ner_input=doubled is scored on the second copy of 'text <eos> text': gold
    equal to the model's own doubled predictions scores 1.0; the same model read single does not."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from training.finetune_data import encode_ner, word_tags_from_subtokens

    export, manifest = causal_ner_export(tmp_path, seed=7, ner_input="doubled")
    tok, model = AutoTokenizer.from_pretrained(export), AutoModelForTokenClassification.from_pretrained(export).eval()
    sentences = [list("湛江市惠珍联合医院"), list("邱县不沿海不通铁路"), list("北京上海天津湖北")]
    own = {}
    for ner_input, separator in (("doubled", tok.eos_token_id), ("single", None)):
        own[ner_input] = []
        for words in sentences:
            ids, _, word_ids = encode_ner(tok, words, ["O"] * len(words), {"O": 0}, max_len=64, tag_subtoken="last",
                                          separator_token_id=separator)
            with torch.no_grad():
                pred = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            own[ner_input].append(word_tags_from_subtokens(pred, word_ids, CAUSAL_NER_LABELS, num_words=len(words),
                                                           tag_subtoken="last"))
    assert own["doubled"] != own["single"] and sum(ner_counts(t, t)[2] for t in own["doubled"]) > 0
    conll = tmp_path / "val.conll"
    conll.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts)) + "\n"
                             for ws, ts in zip(sentences, own["doubled"])), encoding="utf-8")
    assert run(["--export", str(export), "--data", str(conll)], tmp_path)["metrics"]["f1"] == 1.0
    manifest.update(ner_input="single", ner_separator_token_id=None)
    (export / "raylm.json").write_text(json.dumps(manifest))
    assert run(["--export", str(export), "--data", str(conll)], tmp_path)["metrics"]["f1"] < 1.0


def test_a_doubled_manifest_without_its_separator_is_refused_by_serving_reader(tmp_path):
    from serving.export_format import ExportFormatError, read_export

    export, manifest = causal_ner_export(tmp_path, ner_input="doubled")
    assert read_export(export).manifest.ner_separator_token_id == manifest["ner_separator_token_id"]
    manifest["ner_separator_token_id"] = None
    (export / "raylm.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportFormatError, match="ner_input: 'doubled' .* needs ner_separator_token_id"):
        read_export(export)
