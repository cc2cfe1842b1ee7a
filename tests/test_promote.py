"""`python -m training.promote`: a fresh adapter replaces the served one only when it scores at least as well.

Real files, real transformers/peft, serving's own reader and adapter loader, training.evaluate as the judge.
The adapters are built in-process on a tiny Llama export (no Ray Train run): `good` is a LoRA trained for a
few steps on review chats like the test file's, `bad` has random LoRA weights (serving.tiny_exports).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from promote_fixtures import NAME, build_world, setup_served, write_config
from serving.export_format import list_adapters, read_export
from training import promote
from training.config import ConfigError, validate_config
from training.promote_config import PromoteConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("promote"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def history(adapters: Path) -> list[dict]:
    return [json.loads(line) for line in (adapters / "promotions.jsonl").read_text().splitlines()]


def leftovers(adapters: Path) -> list[str]:
    """Anything but the served adapter, the history and the lock file: staged copies must never stay."""
    return sorted(p.name for p in adapters.iterdir() if p.name not in (NAME, "promotions.jsonl", promote.LOCK_FILE))


def served_lora_weights(world, adapters: Path) -> dict[str, torch.Tensor]:
    """The LoRA weights serving's engine holds after loading the served adapter by name."""
    from serving.generation import CausalLMEngine

    engine = CausalLMEngine(read_export(world["base"]), adapters_dir=str(adapters))
    engine.load_adapter(NAME)
    return {k: v.detach().clone() for k, v in engine._peft_model.state_dict().items() if "lora_" in k}


def adapter_file_weights(adapter: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    return [tensors[k] for k in sorted(tensors)]


def test_a_better_candidate_is_promoted_and_serving_loads_it(world, tmp_path, capsys):
    adapters = setup_served(world, tmp_path, world["bad"])
    config = write_config(world, tmp_path, adapters, world["good"])
    assert promote.main(["--config", str(config)]) == 0
    (record,) = history(adapters)
    assert record["decision"] == "promoted" and record["published"] is True
    assert record["candidate"]["value"] < record["served"]["value"]  # perplexity: lower is better
    assert record["metric"] == "perplexity" and record["mode"] == "min" and record["candidate"]["rows"] == 24
    assert "is better than the served" in record["reason"] and record["reason"] in capsys.readouterr().out
    assert record["served"]["sha256"] != record["candidate"]["sha256"]
    assert record["test_files"][0]["sha256"] and record["candidate"]["model_name"] == "good"
    # The served directory now holds the candidate's bytes, and serving's loader serves exactly its weights.
    assert snapshot(adapters / NAME) == snapshot(world["good"])
    assert list_adapters(adapters) == [NAME] and leftovers(adapters) == []
    loaded = served_lora_weights(world, adapters)
    assert len(loaded) == len(adapter_file_weights(world["good"]))
    assert sorted(float(v.sum()) for v in loaded.values()) == pytest.approx(
        sorted(float(t.sum()) for t in adapter_file_weights(world["good"])))


def test_a_worse_candidate_is_not_promoted_and_the_served_files_are_untouched(world, tmp_path):
    adapters = setup_served(world, tmp_path, world["good"])
    before = snapshot(adapters / NAME)
    mtimes = {p: p.stat().st_mtime_ns for p in (adapters / NAME).iterdir()}
    config = write_config(world, tmp_path, adapters, world["bad"])
    assert promote.main(["--config", str(config)]) == 0
    (record,) = history(adapters)
    assert record["decision"] == "kept" and record["published"] is False
    assert record["candidate"]["value"] > record["served"]["value"]
    assert "worse than the served" in record["reason"]
    assert snapshot(adapters / NAME) == before
    assert {p: p.stat().st_mtime_ns for p in (adapters / NAME).iterdir()} == mtimes
    assert leftovers(adapters) == []


def test_a_tie_promotes_and_the_history_only_grows(world, tmp_path):
    adapters = setup_served(world, tmp_path, world["good"])
    copy = shutil.copytree(world["good"], tmp_path / "good-again")
    config = write_config(world, tmp_path, adapters, copy)
    assert promote.main(["--config", str(config)]) == 0
    assert promote.main(["--config", str(config), "--dry-run"]) == 0
    first, second = history(adapters)
    assert first["candidate"]["value"] == first["served"]["value"]
    assert first["decision"] == "promoted" and "equal to the served" in first["reason"]
    assert second["decision"] == "promoted (dry run: not published)" and second["published"] is False
    assert snapshot(adapters / NAME) == snapshot(world["good"]) and leftovers(adapters) == []


def test_the_first_publish_needs_no_comparison(world, tmp_path):
    adapters = setup_served(world, tmp_path, None)
    config = write_config(world, tmp_path, adapters, world["bad"])
    assert promote.main(["--config", str(config)]) == 0
    (record,) = history(adapters)
    assert record["decision"] == "first_publish" and "served" not in record
    assert snapshot(adapters / NAME) == snapshot(world["bad"])
    assert len(served_lora_weights(world, adapters)) == len(adapter_file_weights(world["bad"]))


def _bad_rows(tmp_path, world) -> Path:
    path = tmp_path / "bad-rows.jsonl"
    lines = world["test"].read_text(encoding="utf-8").splitlines()[:6]
    path.write_text("\n".join(lines[:3] + ["{not json", json.dumps({"messages": "hello"})] + lines[3:]) + "\n")
    return path


def _truncated(tmp_path, world) -> Path:
    broken = shutil.copytree(world["good"], tmp_path / "truncated")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return broken


BAD_INPUTS = {
    "missing candidate": (lambda tmp, w: (tmp / "no-such-run", None), "candidate.path", "does not exist"),
    "adapter of another base": (lambda tmp, w: (w["other"], None), "cannot be served on served.base", "hidden_size"),
    "truncated candidate": (lambda tmp, w: (_truncated(tmp, w), None), "candidate.path", "truncated"),
    "not a run or adapter": (lambda tmp, w: (w["base"], None), "candidate.path", "neither a complete raylm checkpoint"),
    "test file with bad rows": (lambda tmp, w: (w["good"], _bad_rows(tmp, w)), "evaluation.files", "2 malformed row(s)"),
    "test file without usable rows": (lambda tmp, w: (w["good"], tmp / "empty.jsonl"), "evaluation.files", "no usable rows"),
    "missing test file": (lambda tmp, w: (w["good"], tmp / "nope.jsonl"), "evaluation.files", "is not a file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_clearly_and_the_served_adapter_stays(world, tmp_path, capsys, case):
    make, key, words = BAD_INPUTS[case]
    adapters = setup_served(world, tmp_path, world["bad"])
    before = snapshot(adapters / NAME)
    candidate, test_file = make(tmp_path, world)
    if test_file is not None and test_file.name == "empty.jsonl":
        test_file.write_text("\n\n")
    config = write_config(world, tmp_path, adapters, candidate, test_file)
    assert promote.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert key in err and words in err, err
    assert snapshot(adapters / NAME) == before and leftovers(adapters) == []
    (record,) = history(adapters)
    assert record["decision"] == "refused" and words in record["reason"]


def test_a_second_promote_waits_its_turn(world, tmp_path, capsys):
    adapters = setup_served(world, tmp_path, world["bad"])
    config = write_config(world, tmp_path, adapters, world["good"])
    with open(adapters / promote.LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert promote.main(["--config", str(config)]) == 3
    assert "another training.promote is running" in capsys.readouterr().err
    assert snapshot(adapters / NAME) == snapshot(world["bad"])
    assert promote.main(["--config", str(config)]) == 0  # the lock is free again


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"evaluation": {"task": "sft", "files": ["t.jsonl"], "metric": "accuracy"}}, "evaluation", ["perplexity"]),
        ({"evaluation": {"task": "ner", "files": ["t.jsonl"]}}, "evaluation.task", ["sft"]),
        ({"served": {"base": "b", "adapters_dir": "a", "adapter_name": "bad/name"}}, "served.adapter_name", ["pattern"]),
        ({"candidate": {"path": "c", "whch": "best"}}, "candidate.whch", ["unknown key"]),
        ({"evaluation": {"files": ["t.jsonl"], "dtype": "float16"}}, "evaluation", ["needs a GPU"]),
    ],
)
def test_bad_config_names_the_key(change, key, words):
    raw = {"kind": "promote", "served": {"base": "b", "adapters_dir": "a", "adapter_name": "n"},
           "candidate": {"path": "c"}, "evaluation": {"files": ["t.jsonl"]}}
    with pytest.raises(ConfigError) as info:
        validate_config({**raw, **change})
    message = str(info.value)
    assert key in message, message
    for word in words:
        assert word in message, message


def test_shipped_promote_configs_validate_with_their_metric_direction():
    for path in sorted((REPO / "configs" / "promote").glob("*.yaml")):
        cfg = validate_config(yaml.safe_load(path.read_text()))
        assert isinstance(cfg, PromoteConfig) and cfg.evaluation.mode == "min", path


def test_a_replica_holding_the_old_adapter_serves_the_promoted_one_next(world, tmp_path):
    """Serving loads, pins and batches an adapter under `<name>@<version>` (the weights file's identity): after
    a promotion renamed a new directory into place, the next request's key differs, so a replica that already
    held the old weights loads the promoted ones instead of answering with what it cached."""
    from serving.generation import CausalLMEngine, GenerationJob, SamplingParams

    adapters = setup_served(world, tmp_path, world["bad"])
    engine = CausalLMEngine(read_export(world["base"]), adapters_dir=str(adapters))
    prompt = engine.encode("这条评论是正面还是负面？\n质量不错，送货也快")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    old_key = engine.adapter_key(NAME)
    engine.load_adapter(old_key)
    (before,) = engine.generate([GenerationJob(prompt, params, old_key)])
    assert engine.adapter_key(NAME) == old_key, "the key is stable while the directory is"

    assert promote.main(["--config", str(write_config(world, tmp_path, adapters, world["good"]))]) == 0
    new_key = engine.adapter_key(NAME)
    assert new_key != old_key and new_key.startswith(f"{NAME}@")
    engine.load_adapter(new_key)
    (after,) = engine.generate([GenerationJob(prompt, params, new_key)])
    fresh = CausalLMEngine(read_export(world["base"]), adapters_dir=str(adapters))  # never saw the old one
    fresh.load_adapter(NAME)
    (expected,) = fresh.generate([GenerationJob(prompt, params, NAME)])
    assert after[0] == expected[0] and after[0] != before[0]


@pytest.mark.gpu
@pytest.mark.unverified  # no GPU this session
def test_scores_on_a_gpu_equal_the_cpu_scores(world, tmp_path):
    """evaluation.device: cuda (the k8s example's) scores both sides like the CPU does, to float tolerance."""
    adapters = setup_served(world, tmp_path, world["bad"])
    values = {}
    for device in ("cpu", "cuda"):
        config = write_config(world, tmp_path, adapters, world["good"], device=device)
        assert promote.main(["--config", str(config), "--dry-run"]) == 0
        values[device] = history(adapters)[-1]
    for side in ("candidate", "served"):
        assert values["cuda"][side]["value"] == pytest.approx(values["cpu"][side]["value"], rel=1e-3)
    assert snapshot(adapters / NAME) == snapshot(world["bad"])  # dry runs publish nothing


def test_a_served_adapter_replaced_during_scoring_is_not_overwritten(world, tmp_path, monkeypatch, capsys):
    """Another publisher renames a new adapter into place while promote scores the old one: promote notices
    (content digest before vs after) and publishes nothing over it."""
    adapters = setup_served(world, tmp_path, world["bad"])
    real_score = promote.score

    def score_then_publish_elsewhere(cfg, adapter, log=print):
        result = real_score(cfg, adapter, log)
        if adapter == adapters.resolve() / NAME:  # the served side: someone else publishes meanwhile
            shutil.rmtree(adapter)
            shutil.copytree(world["other"], adapter)
        return result

    monkeypatch.setattr(promote, "score", score_then_publish_elsewhere)
    config = write_config(world, tmp_path, adapters, world["good"])
    assert promote.main(["--config", str(config)]) == 2
    assert "changed while it was being scored" in capsys.readouterr().err
    assert snapshot(adapters / NAME) == snapshot(world["other"]) and leftovers(adapters) == []
    assert history(adapters)[-1]["decision"] == "refused"
