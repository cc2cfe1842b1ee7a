"""Driver-side steps every run kind shares: resume checks, Ray start/attach, the TorchTrainer, fit.

Importable without side effects (no Ray started, no torch imported at module level), so
`tune/` and other callers can build trainers from the same functions the entry scripts use.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.checkpoints import latest_complete_checkpoint, list_checkpoints
from training.config import ConfigError, read_yaml

FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE")
INTERRUPTED = 130  # exit code of a run stopped with Ctrl-C (the shell's 128 + SIGINT)
MATERIALIZE_MAX_BYTES = 256 * 2**20


def check_resume(cfg, meaning_keys: Sequence[str]) -> str | None:
    """Refuse to mix a new config into an old run's checkpoints; return the latest complete checkpoint if any.

    `meaning_keys` are the dotted config keys that decide what a checkpoint means (model shape, the
    tokenizer, ZeRO sharding; for fine-tuning also the base model, task and adapter shape): they must
    match for its shards to load and mean the same run. Every other key may change on resume (lr,
    max_steps, eval cadence, paths, batch size). The worker count may change too: the shards are
    converted to DeepSpeed's universal format and the global batch is kept by gradient accumulation
    (training.universal), refused here when it cannot be. What the data decides (a tokenizer trained on
    the corpus, a label set) is checked after data preparation by `check_resume_data`.
    Checkpoints whose manifest does not verify (half-written) are skipped with a warning.
    """
    if not list_checkpoints(cfg.run_dir):
        return None
    if not cfg.run.resume:
        raise ConfigError([
            f"run.resume: false, but {cfg.run_dir} already holds checkpoint(s); "
            "pick a new run.name (or set resume: true to continue it)"
        ])
    latest = latest_complete_checkpoint(cfg.run_dir, warn=lambda msg: print(msg, file=sys.stderr))
    if latest is None:
        return None
    saved_path = latest / "resolved_config.yaml"
    if not saved_path.is_file():
        raise ConfigError([
            f"{latest.name}: has no resolved_config.yaml, so it cannot be checked against this config; "
            "restore the file from the run's other checkpoints or pick a new run.name"
        ], f"resume of {cfg.run_dir}")
    saved = read_yaml(saved_path)
    current = cfg.model_dump(mode="json")
    saved_sections: dict[str, dict | None] = {}
    problems = []
    for key in meaning_keys:
        section, _, rest = key.partition(".")
        if not rest:  # a top-level key (task): compared when the checkpoint has it
            if section in saved and saved[section] != current[section]:
                problems.append(_resume_mismatch(key, saved[section], current[section]))
            continue
        if section not in saved_sections:
            saved_sections[section] = _saved_section(cfg, section, saved.get(section))
        if saved_sections[section] is None:
            continue  # neither saved nor derivable from defaults: nothing to compare against
        then, now = _lookup(saved_sections[section], rest), _lookup(current[section], rest)
        if then != now:
            problems.append(_resume_mismatch(key, then, now))
    problems += _global_batch_problems(cfg, latest)
    if problems:
        raise ConfigError(problems, f"resume of {cfg.run_dir}")
    return str(latest)


def check_resume_data(checkpoint: str | None, tokenizer_dir: str, labels: list[str] | None = None,
                      ner_input: str | None = None) -> None:
    """After data preparation: the checkpoint must have been trained with the tokenizer and label set the
    data gives now (a BPE trained on other files, or a label added to the data, changes what its ids
    mean although no config key that `check_resume` compares changed), and an NER checkpoint with the
    input format it reads (`ner_input`, resolved from data.ner_input: 'auto' changed from single to
    doubled for causal bases; a fine-tune checkpoint from before the key read single). Checkpoints
    written without a tokenizer.json or a label list are not compared on that part."""
    if checkpoint is None:
        return
    import json

    problems = []
    saved_vocab = _vocabulary(Path(checkpoint, "tokenizer", "tokenizer.json"))
    new_vocab = _vocabulary(Path(tokenizer_dir, "tokenizer.json"))
    if saved_vocab is not None and new_vocab is not None and saved_vocab != new_vocab:
        differing = len(set(saved_vocab.items()) ^ set(new_vocab.items()))
        problems.append(
            f"tokenizer: {Path(checkpoint).name} was trained with a vocabulary of {len(saved_vocab)} tokens, the data now "
            f"gives {len(new_vocab)} ({differing} token/id pairs differ); restore the tokenizer settings and the "
            "training files it was trained on (a trained BPE depends on them), or pick a new run.name")
    facts_path = Path(checkpoint, "finetune.json")
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    saved_labels = facts.get("labels")
    if labels is not None and saved_labels is not None and list(saved_labels) != list(labels):
        problems.append(_resume_mismatch("labels", saved_labels, labels, now_from="the data now gives"))
    trained_input = facts.get("ner_input", "single")
    if ner_input is not None and facts.get("task") == "ner" and trained_input != ner_input:
        problems.append(
            f"data.ner_input: {Path(checkpoint).name} was trained reading each text {trained_input!r}, the data now "
            f"gives {ner_input!r}; set data.ner_input: {trained_input} to continue it, or pick a new run.name")
    if problems:
        raise ConfigError(problems, f"resume from {checkpoint}")


def _resume_mismatch(key: str, then, now, now_from: str = "config now says") -> str:
    return f"{key}: checkpoint has {then!r}, {now_from} {now!r}; restore it or pick a new run.name"


def _lookup(section, dotted: str):
    """section["a"]["b"] for "a.b"; None where a level is missing."""
    value = section
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _vocabulary(tokenizer_json: Path) -> dict | None:
    """Token -> id of a fast tokenizer file (vocabulary and added tokens); None when there is none."""
    import json

    if not tokenizer_json.is_file():
        return None
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    raw = (data.get("model") or {}).get("vocab") or {}
    # BPE / WordPiece: {token: id}; Unigram: [[token, score], ...] with the position as the id.
    vocab = dict(raw) if isinstance(raw, dict) else {entry[0]: i for i, entry in enumerate(raw)}
    vocab.update({token["content"]: token["id"] for token in data.get("added_tokens") or []})
    return vocab


def data_error_message(err: Exception) -> str:
    """One line for a data-preparation failure: bad input says what is wrong; an OS error says what to fix."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        where = f" ({err.filename})" if err.filename else ""
        return (f"data: cannot read or write the prepared data{where}: {err.strerror or err}; check the permissions "
                "and free disk space of data.prepared_dir (default <run.storage_path>/<run.name>/data)")
    return f"data: {err}"


def _saved_section(cfg, section: str, raw) -> dict | None:
    """A checkpoint's config section with the typed defaults filled in (older checkpoints lack newer keys).

    A null or absent section counts as all defaults when the section has them; a saved section that
    no longer validates (a key since removed) is compared as written; None when nothing can be compared.
    """
    from pydantic import BaseModel, ValidationError

    section_cls = type(cfg).model_fields[section].annotation
    if not (isinstance(section_cls, type) and issubclass(section_cls, BaseModel)):
        return raw if isinstance(raw, dict) else None
    try:
        return section_cls.model_validate(raw if isinstance(raw, dict) else {}).model_dump(mode="json")
    except ValidationError:
        return raw if isinstance(raw, dict) else None


def _global_batch_problems(cfg, checkpoint: Path) -> list[str]:
    """A resumed run keeps its checkpoint's global batch: every worker count it may run at must reach it."""
    import json

    from training.universal import accumulation_for

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config_rows = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.scaling.max_workers
    rows = state.get("global_batch_rows") or config_rows
    problems = []
    for workers in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1):
        try:
            accumulation_for(rows, cfg.optim.micro_batch_size, workers)
        except ValueError as err:
            problems.append(f"scaling.num_workers: resuming {checkpoint.name} on {workers} worker(s): {err}")
    if not problems and rows != config_rows:
        print(f"[raylm] keeping the checkpoint's global batch of {rows} rows per step (this config's is {config_rows}); "
              "gradient accumulation follows the worker count", file=sys.stderr)
    return problems


def start_ray(cfg, address: str | None) -> None:
    """Attach to a cluster when an address is given, else start a private local Ray sized for the run."""
    from training.console import DRIVER_LOG

    per_worker_cpu = cfg.scaling.worker_resources.get("CPU", 1.0)
    # Ray Data's read tasks need a CPU slot of their own; with every core reserved by Train
    # workers the stream starves and the run hangs. One extra logical CPU keeps it moving.
    connect_ray(cfg.run_dir / DRIVER_LOG, address,
                local_cpus=max(os.cpu_count() or 1, math.ceil(cfg.scaling.max_workers * per_worker_cpu) + 1))


def connect_ray(driver_log: Path, address: str | None, local_cpus: int) -> None:
    """The Ray a run or a sweep uses: the cluster at `address` (or RAY_ADDRESS), else a private local Ray of
    `local_cpus` logical CPUs (start_local_ray); an already initialized Ray (embedded use: tests, notebooks,
    tune's trials) is kept as it is.

    Ray's start-up lines go to `driver_log` (training.console); progress bars are off in every process of the
    run, and Ray's INFO chatter off the console, unless RAYLM_CONSOLE=full.
    """
    import ray

    from training.console import keep_driver_logs, quiet_console, quiet_progress_bars

    quiet_env = quiet_progress_bars()  # before any dataset is made: a Dataset keeps the setting it was made with
    quiet_console()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.setdefault("TOKENIZERS_PARALLELISM", "false")
    env_vars.update(quiet_env)
    with keep_driver_logs(driver_log):
        if address:
            ray.init(address=address, runtime_env={"env_vars": env_vars})
            return
        start_local_ray(local_cpus, env_vars)


def put_interpreter_bin_first_on_path() -> None:
    """Put this interpreter's bin directory first on PATH (processes started from here inherit it), as in an
    activated venv and on `python -m cluster.local` nodes.

    torch's JIT build of DeepSpeed's ops runs `ninja` from PATH: the venv's (pip's ninja 1.13, build log v7) and
    the system's (1.11, log v5) each discard the other's .ninja_log ("build log version is too old; starting
    over") and recompile the op in the shared extension cache, 35-60 s on 2 cores each time.
    """
    interpreter_bin = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != interpreter_bin:
        os.environ["PATH"] = os.pathsep.join([interpreter_bin, os.environ.get("PATH", "")])


def start_local_ray(num_cpus: int, env_vars: dict | None = None) -> None:
    """A private local Ray whose every worker carries RAY_ADDRESS (its own GCS, on a port fixed up front).

    When Tune stops a trial (ASHA, PBT, Ctrl-C) its Train controller dies with it, and Train V2's
    PlacementGroupCleaner frees the run's worker placement group after finding the controller dead
    through the state API. That lookup auto-detects the cluster, which fails on a host running several
    Ray instances; the group's CPUs then stay reserved and later trials wait for them forever. The same
    lookup ends a plain training run that way ("Found multiple active Ray instances"). The node and its
    workers run the venv's tools first (put_interpreter_bin_first_on_path).
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    put_interpreter_bin_first_on_path()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the node this init starts
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {**(env_vars or {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def warn_relative_storage(cfg, address: str | None) -> None:
    attached = address or os.environ.get("RAY_ADDRESS")
    if attached and not Path(cfg.run.storage_path).expanduser().is_absolute():
        print(f"[raylm] warning: run.storage_path {cfg.run.storage_path!r} is relative while attached to a cluster; "
              f"under `ray job submit` that is the job's temporary working directory ({cfg.run_dir}). "
              "Use an absolute path on storage every node sees (--set run.storage_path=/shared/runs).", file=sys.stderr)


def parquet_dataset(parquet_path: str):
    """A Ray Data stream of prepared rows; small files are read once into the object store.

    Every rank iterates the whole (unsplit) stream, once per epoch. For data of a few hundred
    MB, re-running the Parquet read for each rank and epoch costs more than the data itself, so
    it is read once, here, and put into the object store as it is (`from_arrow`: the same rows in the
    same order as a materialized `read_parquet`, without that read's file-listing task, footer-reader
    actors and read tasks, each a new worker process: seconds per run); larger data streams from
    Parquet on every pass.
    """
    import ray.data

    if os.path.getsize(parquet_path) <= MATERIALIZE_MAX_BYTES:
        import pyarrow.parquet as pq

        return ray.data.from_arrow(pq.read_table(parquet_path))
    return ray.data.read_parquet(parquet_path)


def torch_trainer(
    cfg,
    train_loop,
    loop_config: dict,
    datasets: dict,
    *,
    callbacks: Sequence = (),
    storage_path: str | None = None,
    name: str | None = None,
    checkpoint_config=None,
):
    """A TorchTrainer for `train_loop` with raylm's scaling, failure, checkpoint and metrics-log settings.

    `callbacks` are added after raylm's MetricsLogCallback (e.g. Tune's TuneReportCallback);
    `storage_path` / `name` override the run's location (default: cfg.run_dir's parent and name).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.console import full_console, quiet_progress_bars
    from training.loop import FAULT_ENV
    from training.tracking import MetricsLogCallback

    storage = storage_path or str(cfg.run_dir.parent)
    run_name = name or cfg.run.name
    # Ray Data's per-operator bars would drown raylm's own progress line (datasets made before this keep theirs:
    # start_ray switches them off first).
    quiet_progress_bars()
    return TorchTrainer(
        train_loop,
        # run_dir: where the workers write checkpoints in place and pick the one to resume (training.loop).
        train_loop_config={**loop_config, "run_dir": str(Path(storage) / run_name), "test_fault": os.environ.get(FAULT_ENV)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,  # (min, max): Ray Train's elastic scaling
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_monitor_interval_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[MetricsLogCallback(str(Path(storage) / run_name)), *callbacks],
            # Ray Train's per-report and checkpoint lines go to its log files, not the console.
            logging_config=LoggingConfig(log_level="INFO" if full_console() else "WARNING"),
        ),
        datasets=datasets,
        # Unsplit and order-preserving: each rank takes its slice of every global batch, so the
        # data order does not depend on timing and a restarted worker resumes exactly.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def fit_off_main_thread(trainer):
    """trainer.fit() in a helper thread; a Ctrl-C reaches the caller as KeyboardInterrupt.

    Called in the main thread, Ray Train V2's fit() installs a SIGINT handler of its own and never puts
    the previous one back: Ctrl-C aborts the run and ends the process with sys.exit(0), so an interrupted
    run exits 0 and its caller's own clean-up never runs (the demo would leave its Ray node behind), and a
    Ctrl-C long after fit() returned calls that handler for a controller that is gone. Off the main
    thread fit() installs none, as under Ray Tune. The run's controller is an actor owned by this driver:
    it ends when the driver exits or calls ray.shutdown().
    """
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    fitter = threading.Thread(target=fit, name="raylm-fit", daemon=True)
    fitter.start()
    while fitter.is_alive():
        fitter.join(timeout=0.5)  # short waits: SIGINT is handled in this thread between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def fit_with_progress(cfg, trainer):
    """trainer.fit() with the live progress line, TensorBoard and MLflow; None when the run failed.

    Ctrl-C: says where the checkpoints are and re-raises KeyboardInterrupt (entry points exit INTERRUPTED).
    """
    from training.console import CONSOLE_ENV, DRIVER_LOG, keep_driver_logs, link_ray_logs
    from training.tracking import ProgressMonitor

    with keep_driver_logs(cfg.run_dir / DRIVER_LOG) as driver_log:
        logs = link_ray_logs(cfg.run_dir)
        every = f", {logs}/ (every Ray process)" if logs else ""
        print(f"[raylm] Ray's logs: {driver_log} (what Ray printed here){every}; {CONSOLE_ENV}=full prints it all "
              "on the console")
        monitor = ProgressMonitor(cfg.run_dir, cfg.redacted_dump(), cfg.run.mlflow_tracking_uri).start()
        try:
            result = fit_off_main_thread(trainer)
        except KeyboardInterrupt:
            monitor.stop(status="KILLED")
            print(f"\n[raylm] interrupted: checkpoints kept in {cfg.run_dir}; rerun the same command to resume",
                  file=sys.stderr)
            raise
        except Exception as err:  # the run failed beyond max_failures: say so, keep what was saved
            monitor.stop(status="FAILED")
            print(f"[raylm] training failed: {err}\n[raylm] checkpoints kept in {cfg.run_dir}; rerun the "
                  f"same command to resume; Ray's logs: {driver_log}", file=sys.stderr)
            return None
        monitor.stop()
    return result
