"""The fine-tuning benchmarks still run: data, baselines and the LoRA/full comparison at tiny sizes.

No figures are asserted (they are the benchmarks' job, benchmarks/results/*.json); the fine-tuning side
of finetune_quality runs Ray Train on SmolLM2 and is too slow for a test (tests/test_finetune_* cover
the command itself).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import finetune_quality
from training.task_metrics import entity_spans

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_peoples_daily_becomes_character_bio_with_person_names_joined():
    sentences = finetune_quality.char_bio("中共中央/nt  主席/n  江/nr  泽民/nr  。/w  李/nr  鹏/nr  到/v  北京/ns  上海/ns")
    assert sentences == [
        (list("中共中央主席江泽民。"), ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "B-PER", "I-PER", "I-PER", "O"]),
        (list("李鹏到北京上海"), ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-LOC", "I-LOC"]),
    ]
    assert entity_spans(sentences[1][1]) == {("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 7)}


def test_data_splits_are_disjoint_balanced_and_baselines_score_them():
    train, test = finetune_quality.load_reviews(200, 100, 64, seed=0)
    assert len(train) == 200 and len(test) == 100
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert sorted(l for _, l in train).count("pos") == 100
    base = finetune_quality.classification_baseline(train, test, seed=0)
    assert 0.5 < base["accuracy"] <= 1.0  # character n-grams separate these reviews better than chance

    ner_train, ner_test = finetune_quality.load_ner(150, 50, 64, seed=0)
    assert all(len(c) == len(t) <= 64 for c, t in ner_train + ner_test)
    assert not {"".join(c) for c, _ in ner_train[:50]} & {"".join(c) for c, _ in ner_test}
    result = finetune_quality.ner_baseline(ner_train, ner_test, seed=0)
    assert result["entities"]["gold"] == sum(len(entity_spans(t)) for _, t in ner_test) > 0
    assert 0.0 <= result["f1"] <= 1.0
    left = finetune_quality.ner_baseline(ner_train, ner_test, seed=0, features=finetune_quality.left_char_features)
    assert left["entities"]["gold"] == result["entities"]["gold"] and 0.0 <= left["f1"] <= 1.0
    # Left context only: nothing at or after the next character reaches the features.
    assert not any("后" in f for f in finetune_quality.left_char_features(list("前中后"), 1))
    assert any("后" in f for f in finetune_quality.char_features(list("前中后"), 1))


def test_finetune_quality_baselines_only_end_to_end(tmp_path):
    out = tmp_path / "fq.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.finetune_quality", "--quick", "--baselines-only",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = dict(item.split("=", 1) for item in proc.stdout.strip().splitlines()[-1].split())
    assert set(last) == {"cls_acc", "cls_baseline", "ner_f1", "ner_baseline"} and last["cls_acc"] == "na"
    result = json.loads(out.read_text())
    assert float(last["cls_baseline"]) == pytest.approx(result["summary"]["cls_baseline"], abs=1e-4)
    # The model choice is measured, not assumed: MiniLM's [UNK] share on this Chinese data is recorded.
    if "minilm_unk_share" in result["model"]:
        assert result["model"]["minilm_unk_share"] > 0.3 and result["model"]["name"].startswith("SmolLM2")


def test_lora_efficiency_on_a_tiny_llama(tmp_path):
    from serving.tiny_exports import build_causal_lm_export

    base = build_causal_lm_export(tmp_path / "tiny", hidden_size=64, num_layers=2)
    out = tmp_path / "le.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lora_efficiency", "--base", str(base), "--repeats", "2",
                           "--micro-batch", "2", "--seq-len", "16", "--threads", "1", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = dict(item.split("=", 1) for item in proc.stdout.strip().splitlines()[-1].split())
    assert set(last) == {"trainable_frac", "adapter_frac", "step_ratio"}
    result = json.loads(out.read_text())
    p = result["params"]
    assert 0 < p["lora_trainable"] < p["lora_total"] and p["full_trainable"] == p["full_total"]
    assert 0 < result["adapter_frac"] < 1 and result["bytes"]["full_checkpoint"] > 0
    assert len(result["step_s"]["lora"]) == len(result["step_s"]["full"]) == 2
    assert result["step_ratio"] > 0


def test_finetune_quality_update_keeps_the_other_tasks_scores(tmp_path):
    """Tasks run as separate invocations land in one file: --update keeps what the earlier one measured."""
    out, work = tmp_path / "fq.json", str(tmp_path / "work")
    common = ["--quick", "--baselines-only", "--workdir", work, "--out", str(out)]
    finetune_quality.main(common + ["--tasks", "cls"])
    first = json.loads(out.read_text())
    assert first["summary"]["cls_baseline"] is not None and first["summary"]["ner_baseline"] is None
    finetune_quality.main(common + ["--tasks", "ner", "--update"])
    both = json.loads(out.read_text())
    assert both["summary"]["cls_baseline"] == first["summary"]["cls_baseline"]
    assert both["summary"]["ner_baseline"] == both["scores"]["ner_baseline"]["f1"] is not None
    assert [run["args"]["tasks"] for run in both["earlier_invocations"]] == ["cls"]
    assert both["earlier_invocations"][0]["load_before"] == first["load_before"]
    finetune_quality.main(common + ["--tasks", "ner"])  # without --update the file holds this run only
    assert json.loads(out.read_text())["summary"]["cls_baseline"] is None


def test_a_command_past_its_timeout_gets_sigint_first(tmp_path):
    """The benchmark's drivers stop their Ray on SIGINT; a SIGKILL would leave its processes behind."""
    marker = tmp_path / "interrupted"
    child = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(marker)!r}, 'w').write('sigint')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        finetune_quality.run_logged([sys.executable, "-c", child], tmp_path / "child.log", timeout=10)
    assert marker.read_text() == "sigint"
    assert "started" in (tmp_path / "child.log").read_text()
