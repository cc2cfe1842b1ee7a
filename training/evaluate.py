"""Evaluate any export on any file with the metrics fine-tuning reports.

    python -m training.evaluate --export runs/x/export --data val.jsonl                 # task from the export
    python -m training.evaluate --export smollm2-export --data reviews.csv --task classification \\
        --shots-from train.csv --shots 4 --text-field review --label-field sentiment      # label likelihood

- causal-lm export: `sft` (chat rows; perplexity on response tokens, as training), `causal-lm` (plain
  text; perplexity on all tokens), or `classification` by label likelihood: each label's verbalization
  is scored after a prompt, zero-shot and, with --shots-from, k-shot (the baseline before fine-tuning).
- sequence-classification export: accuracy and macro-F1. token-classification export: entity-level
  precision / recall / F1 (conlleval). Labels unknown to the export are counted, not guessed.
Reads merged exports with serving's reader (safetensors only, no remote code); an adapter directory
needs --base. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.evaluate", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from training.finetune_data import (
    DataError,
    TaskDataStats,
    read_classification_records,
    read_ner_records,
    read_sft_records,
)
from training.task_metrics import classification_metrics, confusion_matrix, ner_counts, ner_metrics

TASKS = ("sft", "causal-lm", "classification", "ner")
EXPORT_TASKS = {"sft": "causal-lm", "causal-lm": "causal-lm", "ner": "token-classification"}
DEFAULT_PROMPT = "Text: {text}\nLabel:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export directory (or a LoRA adapter directory with --base)")
    p.add_argument("--base", help="the base export an adapter directory was trained on")
    p.add_argument("--data", required=True, nargs="+", help="file(s) to evaluate on")
    p.add_argument("--task", choices=TASKS, help="default: from the export (causal-lm exports: sft)")
    p.add_argument("--out", help="JSON results path (default: evaluate-<export>-<data>.json)")
    p.add_argument("--max-len", type=int, help="tokens per example (default: the export's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")
    p.add_argument("--device", default="cpu", help="torch device the model runs on: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32; losses are computed in float32 either way)")
    f = p.add_argument_group("fields (same names and defaults as the fine-tuning YAML's data section)")
    f.add_argument("--format", default="auto", help="csv | tsv | jsonl | parquet | conll | txt (default: by suffix)")
    f.add_argument("--messages-field", default="messages")
    f.add_argument("--prompt-field", default="prompt")
    f.add_argument("--response-field", default="response")
    f.add_argument("--system-field")
    f.add_argument("--chat-template", help="file holding a Jinja chat template (sft; default: the export's, else ChatML)")
    f.add_argument("--text-field", default="text")
    f.add_argument("--label-field", default="label")
    f.add_argument("--tokens-field", default="tokens")
    f.add_argument("--tags-field", default="tags")
    f.add_argument("--token-column", type=int, default=0)
    f.add_argument("--tag-column", type=int, default=-1)
    f.add_argument("--tag-scheme", default="auto")
    f.add_argument("--word-joiner", help="ner: join words with this string and align by offsets (e.g. '' or ' ')")
    lk = p.add_argument_group("classification by label likelihood (causal-lm exports)")
    lk.add_argument("--prompt-template", default=DEFAULT_PROMPT, help="with {text}; the label follows it")
    lk.add_argument("--labels", help="comma-separated label set (default: the labels in --data and --shots-from)")
    lk.add_argument("--verbalizers", help="label=words pairs, comma-separated (default: each label's own name)")
    lk.add_argument("--shots-from", help="file with labelled examples for the k-shot prompt")
    lk.add_argument("--shots", type=int, default=4, help="examples in the k-shot prompt (spread over the labels)")
    lk.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- build ----------------------------------------------------------------------------------------
def load_export(export_dir: str, base_dir: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer, manifest) of a merged export, or of base + adapter, on `device`. Safetensors only."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from serving.export_format import read_adapter, read_export

    path = Path(export_dir)
    adapter = None
    raylm_json = path / "raylm.json"
    if raylm_json.is_file() and json.loads(raylm_json.read_text()).get("adapter") is True:
        adapter = read_adapter(path)
        if base_dir is None:
            raise DataError(f"{path}: is a LoRA adapter; pass --base <the base export> (or evaluate the merged export)")
        path = Path(base_dir)
    export = read_export(path)
    model_cls = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
    }[export.task]
    tokenizer = AutoTokenizer.from_pretrained(export.path, local_files_only=True)
    model = model_cls.from_pretrained(export.path, use_safetensors=True, local_files_only=True,
                                      dtype=getattr(torch, dtype)).to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter.path)
    model.eval()
    manifest = export.manifest
    if adapter is not None and (trained := adapter.manifest.ner_reading()):  # how the adapter was trained
        manifest = manifest.model_copy(update=trained)
    return model, tokenizer, manifest


def resolve_task(requested: str | None, export_task: str) -> str:
    """The evaluation task, checked against what the export can do."""
    if requested is None:
        return {"causal-lm": "sft", "sequence-classification": "classification", "token-classification": "ner"}[export_task]
    allowed = {"causal-lm": ("sft", "causal-lm", "classification"), "sequence-classification": ("classification",),
               "token-classification": ("ner",)}[export_task]
    if requested not in allowed:
        raise DataError(f"--task {requested}: a {export_task} export evaluates {', '.join(allowed)}")
    return requested


def _pad(rows: list[list[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [value] * (width - len(r)) for r in rows]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- evaluators -------------------------------------------------------------------------------------
def token_loss_sums(model, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> tuple[float, int]:
    """(sum of next-token cross-entropy over labelled tokens, their count), as training's eval sums them."""
    import torch

    total, count = 0.0, 0
    for batch in _batches(examples, batch_size):
        ids = torch.tensor(_pad([e[0] for e in batch], pad_id), device=model.device)
        labels = torch.tensor(_pad([e[1] for e in batch], -100), device=model.device)
        mask = torch.tensor(_pad([[1] * len(e[0]) for e in batch], 0), device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((targets != -100).sum())
    return total, count


def perplexity_metrics(total: float, count: int) -> dict[str, float]:
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "tokens": count}


def classify_ids(model, id_rows: list[list[int]], batch_size: int, pad_id: int) -> list[int]:
    """Predicted label ids of a sequence-classification model."""
    import torch

    preds: list[int] = []
    for batch in _batches(id_rows, batch_size):
        ids = torch.tensor(_pad(batch, pad_id), device=model.device)
        mask = torch.tensor(_pad([[1] * len(r) for r in batch], 0), device=model.device)
        with torch.inference_mode():
            preds.extend(model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist())
    return preds


def tag_subtokens(model, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[list[int]]:
    """Predicted label id per sub-token of a token-classification model, one list per row."""
    import torch

    preds: list[list[int]] = []
    for batch in _batches(rows, batch_size):
        ids = torch.tensor(_pad([r[0] for r in batch], pad_id), device=model.device)
        mask = torch.tensor(_pad([[1] * len(r[0]) for r in batch], 0), device=model.device)
        with torch.inference_mode():
            best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
        preds.extend(b[: len(r[0])] for b, r in zip(best, batch))
    return preds


def label_log_likelihoods(model, tokenizer, prompts: list[str], verbalizations: list[str], batch_size: int,
                          max_len: int) -> list[list[float]]:
    """log p(verbalization | prompt) summed over its tokens, for every prompt x verbalization.

    Prompt and verbalization are tokenized separately and concatenated, so each label is scored on
    exactly its own tokens; over-long prompts lose their beginning (the k-shot examples first)."""
    import torch

    label_ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in verbalizations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = []
    for p_index, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for l_index, ids in enumerate(label_ids):
            keep = max_len - len(ids)
            jobs.append((p_index, l_index, prompt_ids[-keep:] + ids, len(ids)))
    scores = [[0.0] * len(verbalizations) for _ in prompts]
    for batch in _batches(jobs, batch_size):
        ids = torch.tensor(_pad([j[2] for j in batch], pad_id), device=model.device)
        mask = torch.tensor(_pad([[1] * len(j[2]) for j in batch], 0), device=model.device)
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (p_index, l_index, seq, n) in enumerate(batch):
            positions = range(len(seq) - n, len(seq))
            scores[p_index][l_index] = sum(float(logprobs[row, t - 1, seq[t]]) for t in positions)
    return scores


def pick_shots(records: list[tuple[str, str]], labels: list[str], k: int, seed: int) -> list[tuple[str, str]]:
    """k examples spread over the labels in turn (a fixed random order per label)."""
    rng = random.Random(seed)
    by_label = {label: [r for r in records if r[1] == label] for label in labels}
    for pool in by_label.values():
        rng.shuffle(pool)
    shots: list[tuple[str, str]] = []
    while len(shots) < k and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(shots) < k:
                shots.append(by_label[label].pop())
    rng.shuffle(shots)
    return shots


def build_prompt(template: str, text: str, shots: list[tuple[str, str]], verbalizer: dict[str, str]) -> str:
    demos = "".join(template.format(text=t) + verbalizer[l] + "\n\n" for t, l in shots)
    return demos + template.format(text=text)


# ---- the command ------------------------------------------------------------------------------------
def read_records(task: str, args: argparse.Namespace, files: list[str], stats: TaskDataStats) -> list:
    if task == "sft":
        it = read_sft_records(files, messages_field=args.messages_field, prompt_field=args.prompt_field,
                              response_field=args.response_field, system_field=args.system_field, stats=stats)
    elif task == "classification":
        it = read_classification_records(files, text_field=args.text_field, label_field=args.label_field,
                                         fmt=args.format, stats=stats)
    elif task == "ner":
        it = read_ner_records(files, fmt=args.format, token_column=args.token_column, tag_column=args.tag_column,
                              tokens_field=args.tokens_field, tags_field=args.tags_field, scheme=args.tag_scheme,
                              stats=stats)
    else:
        from training.data import CorpusStats, iter_documents

        corpus = CorpusStats()
        docs = iter_documents([Path(f) for f in files], "auto" if args.format == "auto" else args.format,
                              args.text_field, corpus)
        records = [(d, "") for d in (docs if args.limit is None else (d for _, d in zip(range(args.limit), docs)))]
        stats.files, stats.rows = corpus.files, corpus.documents
        stats.skipped_empty, stats.skipped_malformed = corpus.skipped_empty, corpus.skipped_malformed + corpus.skipped_undecodable
        return [r for r, _ in records]
    records = []
    for record, _ in it:
        records.append(record)
        if args.limit is not None and len(records) >= args.limit:
            break
    return records


def evaluate(args: argparse.Namespace, log=print) -> dict:
    """Load, read, score; returns the JSON-ready result."""
    from training.finetune_data import encode_classification, encode_ner, encode_sft, word_tags_from_subtokens

    model, tokenizer, manifest = load_export(args.export, args.base, args.device, args.dtype)
    task = resolve_task(args.task, manifest.task)
    max_len = args.max_len or manifest.max_seq_len
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stats = TaskDataStats()
    records = read_records(task, args, args.data, stats)
    if not records:
        raise DataError(f"{', '.join(args.data)}: no usable rows ({stats.notes[:3]}); check the field options")
    log(f"[evaluate] {manifest.model_name} ({manifest.task}) on {len(records)} rows as {task}")
    result: dict = {"export": str(args.export), "data": args.data, "task": task, "model_name": manifest.model_name}

    if task in ("sft", "causal-lm"):
        if task == "sft":
            template = Path(args.chat_template).read_text() if args.chat_template else None
            examples = [e for e in (encode_sft(tokenizer, m, max_len=max_len, chat_template=template, stats=stats)
                                    for m in records) if e is not None]
        else:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            examples = []
            for doc in records:
                ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
                examples.extend((ids[i : i + max_len], ids[i : i + max_len]) for i in range(0, len(ids), max_len))
        result["metrics"] = perplexity_metrics(*token_loss_sums(model, examples, args.batch_size, pad_id))
    elif task == "classification" and manifest.task == "sequence-classification":
        label2id = {l: i for i, l in enumerate(manifest.labels)}
        known = [(t, l) for t, l in records if l in label2id]
        stats.unknown_labels = len(records) - len(known)
        ids = [encode_classification(tokenizer, t, max_len=max_len, stats=stats) for t, _ in known]
        preds = classify_ids(model, ids, args.batch_size, pad_id)
        confusion = confusion_matrix([label2id[l] for _, l in known], preds, len(manifest.labels))
        result["metrics"] = classification_metrics(confusion)
        result["confusion"] = confusion
        result["labels"] = manifest.labels
    elif task == "classification":
        result.update(evaluate_label_likelihood(model, tokenizer, records, args, max_len, stats, log))
    else:  # ner
        labels = manifest.labels
        placeholder = {"O": 0}
        unknown_types = sorted({t[2:] for _, tags in records for t in tags if t != "O" and t not in labels})
        if unknown_types:
            stats.notes.append(f"entity types {unknown_types} are not in the export's labels: counted as missed")
        encoded = [encode_ner(tokenizer, words, ["O"] * len(words), placeholder, max_len=max_len,
                              word_joiner=args.word_joiner, tag_subtoken=manifest.ner_tag_subtoken,
                              separator_token_id=manifest.ner_separator_token_id if manifest.ner_input == "doubled" else None,
                              stats=stats)
                   for words, _ in records]
        preds = tag_subtokens(model, [(ids, word_ids) for ids, _, word_ids in encoded], args.batch_size, pad_id)
        totals = [0, 0, 0]
        for (words, gold), (_, _, word_ids), pred in zip(records, encoded, preds):
            tags = word_tags_from_subtokens(pred, word_ids, labels, num_words=len(words),
                                            tag_subtoken=manifest.ner_tag_subtoken)
            totals = [a + b for a, b in zip(totals, ner_counts(gold, tags))]
        result["metrics"] = ner_metrics(*totals)
        result["entities"] = dict(zip(("correct", "predicted", "gold"), totals))
    result["rows"] = len(records)
    result["stats"] = asdict(stats)
    return result


def evaluate_label_likelihood(model, tokenizer, records, args, max_len, stats, log) -> dict:
    """Zero-shot and (with --shots-from) k-shot classification by the likelihood of each label's words."""
    shots_pool = []
    if args.shots_from:
        shots_pool = list(r for r, _ in read_classification_records(
            [args.shots_from], text_field=args.text_field, label_field=args.label_field, fmt=args.format,
            stats=TaskDataStats()))
    labels = args.labels.split(",") if args.labels else sorted({l for _, l in records} | {l for _, l in shots_pool})
    verbalizer = {l: " " + l for l in labels}
    if args.verbalizers:
        for pair in args.verbalizers.split(","):
            label, sep, words = pair.partition("=")
            if not sep or label not in verbalizer:
                raise DataError(f"--verbalizers: {pair!r} is not label=words for a label in {labels}")
            verbalizer[label] = " " + words.strip()
    label2id = {l: i for i, l in enumerate(labels)}
    known = [(t, l) for t, l in records if l in label2id]
    stats.unknown_labels = len(records) - len(known)
    gold = [label2id[l] for _, l in known]
    out: dict = {"labels": labels, "verbalizers": verbalizer, "prompt_template": args.prompt_template}
    settings = [("zero_shot", [])]
    if shots_pool:
        shots = pick_shots(shots_pool, labels, args.shots, args.seed)
        settings.append((f"{len(shots)}_shot", shots))
        out["shots"] = [list(s) for s in shots]
    out["metrics"] = {}
    for name, shots in settings:
        prompts = [build_prompt(args.prompt_template, t, shots, verbalizer) for t, _ in known]
        scores = label_log_likelihoods(model, tokenizer, prompts, [verbalizer[l] for l in labels], args.batch_size, max_len)
        preds = [max(range(len(labels)), key=row.__getitem__) for row in scores]
        metrics = classification_metrics(confusion_matrix(gold, preds, len(labels)))
        log(f"[evaluate] {name}: accuracy {metrics['accuracy']:.4f}")
        out["metrics"].update({f"{name}_{k}": v for k, v in metrics.items()})
    return out


def format_table(result: dict) -> str:
    rows = [("task", result["task"]), ("rows", result["rows"])]
    rows += [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result["metrics"].items()]
    stats = result["stats"]
    rows += [(k, stats[k]) for k in ("skipped_empty", "skipped_malformed", "skipped_too_long", "truncated", "unknown_labels")
             if stats.get(k)]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        result = evaluate(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - started, 2)
    out = Path(args.out or f"evaluate-{Path(args.export).name}-{Path(args.data[0]).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(format_table(result))
    for note in result["stats"]["notes"][:5]:
        print(f"note: {note}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
