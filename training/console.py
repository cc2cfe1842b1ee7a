"""The console of a raylm run: raylm's own lines, warnings and errors; Ray's chatter in files beside the run.

Three places make the chatter, and each is quieted where it starts:
- progress bars (Ray Data's per-dataset bars in every Train worker, Hugging Face's download and save bars):
  `quiet_progress_bars` switches them off in this process and, through the environment, in Ray's workers;
- the Train workers' own loggers (Ray Train's "Reporting training result" line per rank per report and
  its checkpoint lines, DeepSpeed's config dumps): `quiet_console`, called in every worker, keeps them
  off the worker's console stream; they stay in Ray's session logs (`logs/train/`, `logs/worker-*`);
- this driver: Ray's own INFO lines and every line Ray forwards from its workers (log_to_driver), Tune's
  among them: `keep_driver_logs` writes all of it to a `driver.log` file and lets through to the console
  raylm's lines (`[raylm...`), warnings and errors only.

`RAYLM_CONSOLE=full` shows everything as Ray prints it (driver.log is written either way).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

CONSOLE_ENV = "RAYLM_CONSOLE"  # "full": every line on the console, as Ray prints it
DRIVER_LOG = "driver.log"
RAY_LOGS_LINK = "ray_logs"

# Read by each library when it is imported (tqdm: TQDM_DISABLE when tqdm is first imported), so they are set
# in this process before those imports where possible and handed to Ray's workers through their environment.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # a bar per dataset iteration in every Train worker
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Writing model shards", "Loading weights" bars
    "TQDM_DISABLE": "1",  # any other tqdm bar (raylm's own progress bar passes disable=False)
}

# A forwarded worker line is shown when it is raylm's or carries a warning/error level or an exception.
_SHOWN = re.compile(r"^\[raylm|\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|\b\w*(Warning|Error|Exception)\b:")
# Shown on a cluster of several nodes only: where each rank runs (training.loop prints it at start).
_PLACEMENT = "raylm-worker rank="
# Warnings that are not the user's to act on, kept in driver.log only. The raylet counts the worker
# processes it started against 4x its start-up concurrency (the CPU count, 2 here): every Train worker,
# Ray Data task and Tune trial is one, so a 2-worker run on 2 cores passes it without anything wrong.
# Ray Data warns once per worker that its progress bars are off: quiet_progress_bars switched them off.
_NOISE = ("PYTHON worker processes have been started on node", "Progress bars disabled. To enable, set")


def full_console() -> bool:
    """RAYLM_CONSOLE=full: the user asked to see every line, as Ray prints it."""
    return os.environ.get(CONSOLE_ENV, "").strip().lower() == "full"


def quiet_progress_bars() -> dict[str, str]:
    """Switch off the progress bars of Ray Data, Hugging Face and tqdm for this run's processes.

    Sets `QUIET_ENV` in this process's environment (kept where the user set a value; a local Ray node
    started afterwards passes it to every worker) and applies it to the libraries already imported here.
    Returns the variables to put into Ray's runtime_env (workers of a cluster this driver attaches to):
    `QUIET_ENV` and RAYLM_CONSOLE itself, or only the latter with RAYLM_CONSOLE=full.
    """
    forward = {CONSOLE_ENV: os.environ[CONSOLE_ENV]} if CONSOLE_ENV in os.environ else {}
    if full_console():
        return forward
    _drop_deepspeed_cpu_notice()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "ray.data" in sys.modules:  # a Dataset copies the context current when it is created
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return {**{key: os.environ[key] for key in QUIET_ENV}, **forward}


class _DeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
    detect it." A driver imports deepspeed only by way of transformers or peft and trains nothing with it; the
    Train workers set DS_ACCELERATOR (training.loop), so theirs is never guessed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


def _drop_deepspeed_cpu_notice() -> None:
    # On the logger itself, before deepspeed is imported (the notice comes during that import): DeepSpeed's own
    # set-up adds its handler to this same logger and keeps its filters.
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DeepSpeedCpuNotice())


class _LevelNamed(logging.Formatter):
    """'%(message)s', with 'WARNING: ' / 'ERROR: ' before the message of a warning or an error."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


class _RayTrainInfoFilter(logging.Filter):
    """Drops Ray Train's own INFO records (a "Reporting training result" line per rank per report,
    checkpoint chatter); warnings and errors pass. Ray 2.60 names some of its loggers by file path
    (`logging.getLogger(__file__)`), which its own `RunConfig(logging_config=...)` level misses."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = "." + record.name.replace(os.sep, ".") + "."
        return record.levelno >= logging.WARNING or ".ray.train." not in name


def quiet_console() -> None:
    """Keep Ray Train's, Ray Data's and DeepSpeed's INFO lines off this process's console stream.

    Called in every Train worker (and on the driver by training.driver.start_ray); does nothing with
    RAYLM_CONSOLE=full. A worker's console stream is what Ray forwards to the driver; the files under
    the Ray session's `logs/` keep Ray's full logs: Ray Train's under `logs/train/`, Ray Data's under
    `logs/ray-data/`.
    """
    if full_console():
        return
    import ray.data  # noqa: F401 - importing Ray Data sets up the loggers adjusted below
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PlainRayHandler) and not any(isinstance(f, _RayTrainInfoFilter) for f in handler.filters):
            handler.addFilter(_RayTrainInfoFilter())
    for name in ("", "ray", "ray.train", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PlainRayHandler):
                # In a Ray worker these print the bare message: name the level of a warning or error, so that the
                # driver (keep_driver_logs) tells it from chatter.
                handler.plain_handler.setFormatter(_LevelNamed())
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)  # "Starting execution of Dataset ...", its plan, progress, "finished"
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dumps; warnings still show
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per step: not the user's to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # peft 0.21 reads transformers 5's deprecated alias when it wraps a model, once per worker: not the user's either.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def link_ray_logs(run_dir: Path) -> Path | None:
    """`<run_dir>/ray_logs` -> this Ray session's log directory, where the full logs of every process go.

    Ray keeps a session's directory after it shuts down. Returns the link, or None when this process
    is not connected to Ray.
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public accessor for the session dir
    if not ray.is_initialized() or node is None:
        return None
    logs = Path(node.get_session_dir_path()) / "logs"
    link = Path(run_dir) / RAY_LOGS_LINK
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():  # a copy kept by an earlier run of the same run directory
        import shutil

        shutil.rmtree(link)
    link.symlink_to(logs, target_is_directory=True)
    return link


# ---- the driver's logs ---------------------------------------------------------------------------------


class _DriverLogs:
    """What `keep_driver_logs` installed; contexts nest (the demo's log, then each stage's run's log)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.files: list = []  # open driver.log files, outermost first: every line goes to each
        self.levels: list[tuple[logging.Handler, int]] = []  # console handlers raised to WARNING, old level
        self.placement_shown: bool | None = None
        self.installed = False  # forward() is in Ray's dispatcher (it stays there once put in)
        self.grace_until = 0.0  # after the last context closed: late lines still kept off the console until then

    def write(self, text: str) -> None:
        with self.lock:
            for fh in self.files:
                fh.write(text)

    def forward(self, data: dict) -> None:
        """Ray's worker-output dispatcher calls this first with each batch of forwarded lines: all of them
        go to the files; Ray's own printer, called next with the same dict, prints what is left in it."""
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        from ray._private.worker import filter_autoscaler_events

        if data.get(_SEEN) or not (self.files or time.monotonic() < self.grace_until):
            return  # outside keep_driver_logs (and its grace period): Ray prints the batch as it is
        data[_SEEN] = True
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":  # its monitor's whole log: Ray prints only the events in it
            lines = list(filter_autoscaler_events(lines))
        who = data.get("actor_name") or data.get("task_name")
        where = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{where}) "  # as Ray prints it, without colours
        self.write("".join(prefix + line + "\n" for line in lines if RAY_TQDM_MAGIC not in line))
        if full_console():
            return
        if data.get("pid") == "autoscaler":
            data["lines"] = []  # "Resized to N CPUs", nodes added: in the file only
            return
        shown, placements, in_traceback = [], [], False
        for line in lines:
            in_traceback = in_traceback or line.startswith("Traceback (most recent call last)")
            if RAY_TQDM_MAGIC in line or any(noise in line for noise in _NOISE):
                continue
            if line.startswith(_PLACEMENT) and self._placement_shown():
                placements.append(line)
            elif in_traceback or _SHOWN.search(line):
                shown.append(line)
        data["lines"] = shown
        if placements:
            # Printed here, not by Ray's printer: its deduplicator drops words with digits, so every rank's
            # "raylm-worker rank=N node_id=..." looks the same and all but the first rank's line would collapse
            # into "[repeated Nx across cluster]" - the one line that says where each rank runs.
            stream = sys.stderr if data.get("is_err") else sys.stdout
            stream.write("".join(prefix + line + "\n" for line in placements))
            stream.flush()

    def _placement_shown(self) -> bool:
        if self.placement_shown is None:
            self.placement_shown = _node_count() > 1
        return self.placement_shown


_state = _DriverLogs()
_FORWARD_NAME = "raylm_driver_log"
_SEEN = "_raylm_driver_log"  # set on a batch that _DriverLogs.forward has handled


def _print_errors(original):
    """Ray prints the raylet's error messages (a worker killed for memory, a warning about the worker pool) with
    print_to_stdstream directly, not through the dispatcher that forward() sits in: these pass forward() too."""

    def print_to_stdstream(data, ignore_prefix: bool):
        _state.forward(data)  # a no-op outside keep_driver_logs, or for a batch it has seen
        if data.get("lines"):
            original(data, ignore_prefix)

    return print_to_stdstream


# Worker lines arrive through Ray's log monitor a moment after they were printed, and Ray Train's placement-group
# cleaner reports a stopped run's controller seconds after fit() returned: for this long after the last context
# closed, such late lines are still kept off the console (Ray's session logs have them).
_GRACE_S = 60.0


# Loggers whose console output goes to driver.log, warnings and errors also to the console. Ray's loggers that
# do not propagate carry their own console handler ("ray": Ray core, Tune, Train on this driver; "ray.data").
_DRIVER_LOGGERS = ("ray", "ray.data", "DeepSpeed")


@contextlib.contextmanager
def keep_driver_logs(log_file: Path):
    """Within: Ray's chatter on this driver goes to `log_file` (appended); the console shows raylm's lines,
    warnings and errors.

    Ray's loggers here ("ray", "ray.data", DeepSpeed's) write everything to the file and only warnings
    and errors to the console; the lines Ray forwards from its workers' stdout/stderr (log_to_driver) all go
    to the file, and to the console when raylm printed them or they carry a warning, an error or a
    traceback (`raylm-worker rank=... node_id=...` too when the cluster has several nodes). May be entered
    before or after ray.init; contexts nest, every open one receives every line. Worker lines arriving in the
    minute after the last context closed are still kept off the console (`_GRACE_S`), in no file.
    With RAYLM_CONSOLE=full the file is written and the console left as Ray prints it.
    """
    import ray._private.worker as ray_worker
    import ray.data  # noqa: F401 - its import sets up the "ray.data" logger's console handler
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = log_file.open("a", encoding="utf-8", buffering=1)
    file_handler = logging.StreamHandler(fh)
    file_handler.setLevel(logging.INFO)  # "ray.data" logs at DEBUG to its own file
    file_handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
    outermost = not _state.files
    loggers = [logging.getLogger(name) for name in _DRIVER_LOGGERS]
    with _state.lock:
        _state.files.append(fh)
    for lg in loggers:
        lg.addHandler(file_handler)
    if outermost:
        if not full_console():
            for lg in loggers:
                for handler in lg.handlers:
                    if handler is not file_handler and _is_console(handler) and handler.level < logging.WARNING:
                        _state.levels.append((handler, handler.level))
                        handler.setLevel(logging.WARNING)
        _state.placement_shown = None  # decided at the first placement line, once Ray is up
        if not _state.installed:  # once per process; forward() does nothing outside a context and its grace
            with dispatcher._lock:  # first: it trims the batch that Ray's own printer (added by ray.init) prints next
                dispatcher.handlers.insert(0, (_FORWARD_NAME, _state.forward))
            ray_worker.print_to_stdstream = _print_errors(ray_worker.print_to_stdstream)  # looked up at each call
            _state.installed = True
    try:
        yield log_file
    finally:
        for lg in loggers:
            lg.removeHandler(file_handler)
        with _state.lock:
            _state.files.remove(fh)
        fh.close()
        if outermost:
            _state.grace_until = time.monotonic() + _GRACE_S
            for handler, level in _state.levels:
                handler.setLevel(level)
            _state.levels.clear()


def _is_console(handler: logging.Handler) -> bool:
    from ray._private.log import PlainRayHandler

    if isinstance(handler, PlainRayHandler):
        return True
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in streams


def _node_count() -> int:
    import ray

    try:
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception:  # noqa: BLE001 - only decides whether placement lines are shown
        return 1
