"""Promote a fresh LoRA adapter into serving only when it scores at least as well as the served one.

    python -m training.promote --config configs/promote/sft_smollm2_cpu.yaml [--set candidate.path=runs/x] [--dry-run]

Reads top to bottom as the algorithm: parse -> validate (the config, then the served base, the adapters
directory, the candidate and the test file, every problem at once) -> lock the adapters directory -> stage
the candidate inside it (a hidden directory serving never lists, re-read with serving's `read_adapter` and
checked against the served base with serving's `adapter_problems`) -> score the candidate and the served
adapter with `training.evaluate` on the same test file, with the task's metric -> decide (ties promote; the
first publish needs no comparison) -> publish by rename (`training.export.commit_dir`, as
`training.export --publish-to` does) or drop the staged copy -> append the decision to
`<adapters_dir>/promotions.jsonl` and print it. A refusal (bad input, an incompatible adapter, a test file
with bad rows) is recorded there too, and leaves the served adapter as it was.

Exit codes: 0 decided (promoted or kept), 2 bad config or input, 3 another promote holds the adapters directory.
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("training.promote", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from serving.export_format import ExportFormatError, adapter_problems, read_adapter, read_export
from training.config import ConfigError, load_config_of_kind, resolve_data_path
from training.promote_config import PromoteConfig

EXIT_DECIDED, EXIT_INVALID, EXIT_BUSY = 0, 2, 3
LOCK_FILE = ".promote.lock"


class PromoteError(Exception):
    """A refusal: nothing was published; the message says what is wrong and how to fix it."""

    def __init__(self, problems: list[str] | str, exit_code: int = EXIT_INVALID):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))
        self.exit_code = exit_code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.promote", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="promote YAML with kind: promote (see configs/promote/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set candidate.path=/mnt/shared/raylm-runs/x (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="score and decide, record it, but publish nothing")
    parser.add_argument("--validate-only", action="store_true", help="check the config and its inputs, then exit")
    return parser.parse_args(argv)


# ---- validate -----------------------------------------------------------------------------------
def is_adapter_dir(path: Path) -> bool:
    """A directory written by `training.export --adapter` (its raylm.json says adapter: true)."""
    manifest = path / "raylm.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")).get("adapter") is True
    except (OSError, json.JSONDecodeError):
        return False


def candidate_checkpoint(cfg: PromoteConfig) -> Path:
    """The fine-tune checkpoint a run-directory candidate names; raises PromoteError if it is not a LoRA run."""
    from training.config import read_yaml
    from training.export import find_checkpoint

    path = Path(resolve_data_path(cfg.candidate.path))
    try:
        checkpoint = find_checkpoint(path, cfg.candidate.which)
    except FileNotFoundError as err:
        raise PromoteError(f"candidate.path: {err}; or give an adapter directory (training.export --adapter)") from None
    run = read_yaml(checkpoint / "resolved_config.yaml")
    method = (run.get("method") or {}).get("type")
    if run.get("kind") != "finetune" or method != "lora":
        raise PromoteError(f"candidate.path: {checkpoint} is a {run.get('kind', 'pretrain')} checkpoint"
                           f"{f' with method {method}' if method else ''}; serving multiplexes LoRA adapters only, "
                           "so the candidate must be a LoRA fine-tune run (method.type: lora) or its adapter export")
    return checkpoint


def input_problems(cfg: PromoteConfig) -> list[str]:
    """What is wrong with the served side, the candidate and the test files (before any model is loaded)."""
    problems = []
    try:
        base = read_export(resolve_data_path(cfg.served.base))
        if base.task != "causal-lm":
            problems.append(f"served.base: {base.path} is a {base.task} export; serving multiplexes adapters of "
                            "causal-lm exports only (other tasks are served as merged exports)")
    except (ExportFormatError, FileNotFoundError) as err:
        problems.append(f"served.base: {err}")
    adapters_dir = Path(resolve_data_path(cfg.served.adapters_dir))
    if not adapters_dir.is_dir():
        problems.append(f"served.adapters_dir: {adapters_dir} is not a directory (the served app's adapters_dir; "
                        "create it empty for a first publish)")
    elif (adapters_dir / cfg.served.adapter_name).exists() and not problems:
        try:
            served = read_adapter(adapters_dir / cfg.served.adapter_name)
            problems += [f"served adapter {served.path}: {p}; it cannot be compared against (move it aside to publish "
                         "anew)" for p in adapter_problems(served, base)]
        except ExportFormatError as err:
            problems.append(f"served adapter: {err}; it cannot be compared against (move it aside to publish anew)")
    candidate = Path(resolve_data_path(cfg.candidate.path))
    if not candidate.exists():
        problems.append(f"candidate.path: {candidate} does not exist (the fine-tune run directory, a checkpoint "
                        "of it, or an adapter directory)")
    elif is_adapter_dir(candidate):
        try:
            read_adapter(candidate)
        except ExportFormatError as err:
            problems.append(f"candidate.path: {err}")
    else:
        try:
            candidate_checkpoint(cfg)
        except PromoteError as err:
            problems += err.problems
    for spec in cfg.evaluation.files:
        try:
            if not Path(resolve_data_path(spec)).is_file():
                problems.append(f"evaluation.files: {spec} is not a file (the fixed test file)")
        except FileNotFoundError as err:
            problems.append(f"evaluation.files: {err}")
    return problems


def evaluate_args(cfg: PromoteConfig, adapter: Path | None = None, out: Path | None = None) -> argparse.Namespace:
    """training.evaluate's own arguments for one side (its parser fills every default)."""
    from training import evaluate

    files = [resolve_data_path(f) for f in cfg.evaluation.files]
    argv = [*cfg.evaluation.evaluate_argv(), "--data", *files]
    argv += ["--export", str(adapter or "-"), "--base", resolve_data_path(cfg.served.base)]
    if out is not None:
        argv += ["--out", str(out)]
    return evaluate.parse_args(argv)


def held_out_file_problems(cfg: PromoteConfig) -> list[str]:
    """Rows of the fixed test file that training.evaluate would skip: the two sides must be scored on every
    row of it, so a bad row is an error to fix in the file, not a silent skip."""
    from training import evaluate
    from training.finetune_data import DataError, TaskDataStats

    args = evaluate_args(cfg)
    stats = TaskDataStats()
    try:
        records = evaluate.read_records(cfg.evaluation.task, args, args.data, stats)
    except (DataError, ValueError) as err:
        return [f"evaluation.files: {err}"]
    return row_problems(stats, len(records), ", ".join(args.data))


def row_problems(stats, rows: int, where: str) -> list[str]:
    """Skipped or unknown-label rows counted by training.evaluate, as problems naming the first few rows."""
    counts = {"empty": stats.skipped_empty, "malformed": stats.skipped_malformed,
              "too long": stats.skipped_too_long, "with a label outside the label set": stats.unknown_labels}
    bad = [f"{n} {what}" for what, n in counts.items() if n]
    if not rows:
        return [f"evaluation.files: {where}: no usable rows ({'; '.join(stats.notes[:3]) or 'empty'}); check the "
                "evaluation field options"]
    if bad:
        return [f"evaluation.files: {where}: {', '.join(bad)} row(s) ({'; '.join(stats.notes[:3])}); the fixed "
                "test file must be clean, so both adapters are scored on every row: fix or remove those rows"]
    return []


# ---- build: lock, stage -------------------------------------------------------------------------
@contextmanager
def adapters_lock(adapters_dir: Path):
    """One promote at a time per adapters directory (a scheduled run and a manual one must not interleave)."""
    handle = open(adapters_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PromoteError(f"{adapters_dir}: another training.promote is running on this adapters directory "
                               f"(it holds {LOCK_FILE}); wait for it and rerun", EXIT_BUSY) from None
        yield
    finally:
        handle.close()


def stage_candidate(cfg: PromoteConfig, adapters_dir: Path) -> Path:
    """A copy of the candidate adapter as a hidden directory inside `adapters_dir` (same filesystem, so
    publishing it is one rename; serving's list_adapters skips it), verified with serving's reader."""
    from training.export import staged_export

    staged = adapters_dir / f".{cfg.served.adapter_name}.candidate-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    source = Path(resolve_data_path(cfg.candidate.path))
    if is_adapter_dir(source):
        def write(tmp: Path) -> None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)

        staged_export(staged, write, lambda tmp: read_adapter(tmp))
    else:
        from training.finetune_export import _checkpoint_facts, export_adapter

        checkpoint = candidate_checkpoint(cfg)
        export_adapter(checkpoint, staged, *_checkpoint_facts(checkpoint))
    return staged


def compatibility_problems(staged: Path, base_path: str) -> list[str]:
    """Why serving would refuse the candidate on the served base (empty when it would serve it)."""
    problems = adapter_problems(read_adapter(staged), read_export(resolve_data_path(base_path)))
    return [f"candidate cannot be served on served.base: {p}" for p in problems]


# ---- run: score, decide, publish, record ----------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: Path) -> str:
    """sha256 over every file's relative name and bytes: the served adapter's identity in the record."""
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_of(item).encode())
    return digest.hexdigest()


def adapter_facts(path: Path) -> dict:
    """Where an adapter came from (its manifest's provenance) and its content digest, for the record."""
    manifest = read_adapter(path).manifest.model_dump(mode="json")
    keep = ("model_name", "base_model", "source_checkpoint", "trained_steps", "exported_at", "eval")
    return {**{k: manifest[k] for k in keep if k in manifest}, "sha256": directory_digest(path)}


def score(cfg: PromoteConfig, adapter: Path, log=print) -> dict:
    """training.evaluate on the fixed test file with `adapter` on the served base; returns its result."""
    from training import evaluate
    from training.finetune_data import DataError, TaskDataStats

    try:
        result = evaluate.evaluate(evaluate_args(cfg, adapter), log=log)
    except (DataError, ValueError, FileNotFoundError) as err:
        raise PromoteError(f"evaluating {adapter.name}: {err}") from None
    problems = row_problems(TaskDataStats(**result["stats"]), result["rows"], ", ".join(result["data"]))
    if problems:
        raise PromoteError(problems)
    value = result["metrics"].get(cfg.evaluation.metric)
    if value is None or not math.isfinite(value):
        raise PromoteError(f"evaluating {adapter.name}: {cfg.evaluation.metric} is {value!r} "
                           f"(metrics: {result['metrics']}); a non-finite score is never promoted")
    return result


def decide(cfg: PromoteConfig, candidate: float, served: float | None) -> tuple[bool, str, str]:
    """(publish?, decision, reason). At least as good publishes: ties promote."""
    metric, mode = cfg.evaluation.metric, cfg.evaluation.mode
    if served is None:
        return True, "first_publish", f"nothing is served as '{cfg.served.adapter_name}' yet: the candidate is published"
    better = candidate <= served if mode == "min" else candidate >= served
    relation = "equal to" if candidate == served else ("better than" if better else "worse than")
    direction = "lower" if mode == "min" else "higher"
    reason = f"candidate {metric} {candidate:.6g} is {relation} the served {served:.6g} ({direction} is better)"
    return better, ("promoted" if better else "kept"), reason


def append_record(path: Path, record: dict) -> None:
    """One JSON line appended and flushed to disk: the history is never rewritten."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def base_record(cfg: PromoteConfig, config_path: str, dry_run: bool) -> dict:
    files = [Path(resolve_data_path(f)) for f in cfg.evaluation.files]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": cfg.run.name, "config": config_path, "dry_run": dry_run,
        "adapter_name": cfg.served.adapter_name, "adapters_dir": str(Path(resolve_data_path(cfg.served.adapters_dir))),
        "base": resolve_data_path(cfg.served.base), "candidate_source": resolve_data_path(cfg.candidate.path),
        "task": cfg.evaluation.task, "metric": cfg.evaluation.metric, "mode": cfg.evaluation.mode,
        "test_files": [{"path": str(f), "sha256": sha256_of(f)} for f in files if f.is_file()],
    }


def record_refusal(cfg: PromoteConfig, config_path: str, dry_run: bool, problems: list[str]) -> None:
    """Input problems found before anything was staged are recorded too, when the adapters directory exists."""
    adapters_dir = Path(resolve_data_path(cfg.served.adapters_dir))
    if adapters_dir.is_dir():
        record = base_record(cfg, config_path, dry_run)
        record.update(decision="refused", published=False, reason="; ".join(problems))
        append_record(adapters_dir / cfg.served.history_file, record)


def promote(cfg: PromoteConfig, config_path: str, dry_run: bool = False, log=print) -> dict:
    """Stage, score, decide, publish, record; returns the record. Raises PromoteError (recorded) on refusal."""
    adapters_dir = Path(resolve_data_path(cfg.served.adapters_dir)).resolve()
    served_dir = adapters_dir / cfg.served.adapter_name
    record = base_record(cfg, config_path, dry_run)
    history = adapters_dir / cfg.served.history_file
    with adapters_lock(adapters_dir):
        staged = None
        try:
            problems = held_out_file_problems(cfg)
            if problems:
                raise PromoteError(problems)
            staged = stage_candidate(cfg, adapters_dir)
            problems = compatibility_problems(staged, cfg.served.base)
            if problems:
                raise PromoteError(problems)
            record["candidate"] = adapter_facts(staged)
            log(f"[promote] scoring the candidate ({record['candidate_source']}) on {len(record['test_files'])} test file(s)")
            candidate = score(cfg, staged, log)
            record["candidate"].update(value=candidate["metrics"][cfg.evaluation.metric], metrics=candidate["metrics"],
                                       rows=candidate["rows"])
            served_value = None
            if served_dir.exists():
                record["served"] = adapter_facts(served_dir)
                log(f"[promote] scoring the served adapter {served_dir}")
                served = score(cfg, served_dir, log)
                served_value = served["metrics"][cfg.evaluation.metric]
                record["served"].update(value=served_value, metrics=served["metrics"], rows=served["rows"])
            publish, decision, reason = decide(cfg, record["candidate"]["value"], served_value)
            if publish and not dry_run:
                now = directory_digest(served_dir) if served_dir.exists() else None
                if now != record.get("served", {}).get("sha256"):
                    raise PromoteError(f"{served_dir} changed while it was being scored (another publisher); "
                                       "nothing was published: rerun the promote")
                from training.export import commit_dir

                commit_dir(staged, served_dir, replace=True)
                staged = None
            record.update(decision=decision if not dry_run else f"{decision} (dry run: not published)",
                          published=publish and not dry_run, reason=reason)
        except PromoteError as err:
            record.update(decision="refused", published=False, reason=str(err))
            append_record(history, record)
            raise
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        append_record(history, record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_of_kind(args.config, args.set, "promote")
        problems = input_problems(cfg)
        if problems:
            record_refusal(cfg, args.config, args.dry_run, problems)
            raise ConfigError(problems, args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    if args.validate_only:
        print(f"{args.config}: valid")
        return EXIT_DECIDED
    try:
        record = promote(cfg, args.config, dry_run=args.dry_run)
    except PromoteError as err:
        print(f"promote: refused, nothing published: {err}", file=sys.stderr)
        return err.exit_code
    print(f"[promote] {record['decision']}: {record['reason']}")
    print(f"[promote] record appended to {Path(record['adapters_dir']) / cfg.served.history_file}")
    return EXIT_DECIDED


if __name__ == "__main__":
    sys.exit(main())
