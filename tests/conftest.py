"""Settings every test process shares (no usage stats, quiet tokenizers, no hub access), and the one local
Ray that the Ray Train / Tune modules share."""

import hashlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller takes one report per health-check interval (2 s by default) and a worker's
# next report waits for it; the tests report every step of a ~50 ms step, so poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# DeepSpeed JIT-builds its CPU shared-memory comm op into torch's extension cache (~/.cache/torch_extensions/
# py311_cpu by default), and rebuilds it (35-50 s on 2 cores, inside whichever Train worker loads it first) whenever
# the cached build was made from a venv at another path: two venvs (or one venv seen at two paths) on a machine
# rebuild each other's copy all day (the cache's .ninja_log showed 8 alternating rebuilds in 80 min). One cache per
# interpreter keeps the first build. Every process of a test inherits it: Ray's raylet and workers, `ray start`
# nodes, subprocess drivers.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path.home() / ".cache" / "torch_extensions" / f"raylm-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}"))
# Every process of a test (Ray's nodes and workers, `ray start` nodes, subprocess drivers) runs the venv's tools
# first, as training.driver.start_local_ray gives its nodes: else the system's ninja and the venv's discarded each
# other's build log and recompiled DeepSpeed's comm op three times a suite run.
from training.driver import put_interpreter_bin_first_on_path  # noqa: E402 - after the environment above

put_interpreter_bin_first_on_path()

SHARED_RAY_FIXTURE = "local_ray"
_shared_ray = {"gcs_address": None}


def _start_shared_ray() -> None:
    """4 logical CPUs (two 1-CPU Train workers, or a Serve replica beside them, plus Ray Data's read tasks),
    the dashboard on (Train V2 queries its controller through it), every worker carrying RAY_ADDRESS
    (training.driver.start_local_ray: Tune's stopped trials free their placement groups on a shared host)."""
    import ray

    from local_ports import free_port
    from serving_fixtures import API_KEYS, QUICK_REPLICA_STOP_ENV, serving_node_env
    from training.driver import start_local_ray

    env_vars = {"TOKENIZERS_PARALLELISM": "false",
                # a loaded shared machine can take longer than Ray Train's 60 s default to start a worker group
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    with pytest.MonkeyPatch.context() as env:
        # Read from Ray's environment when a module deploys Serve on this Ray (tests/test_finetune_serve.py):
        # the replica's API keys, and the serving node's request path and error hook (serving_node_env).
        env.setenv("RAYLM_API_KEYS", ",".join(API_KEYS))
        for key, value in serving_node_env(free_port(), free_port(), free_port()).items():  # HAProxy's own ports
            env.setenv(key, value)
        # Metrics reach the node's export port every second instead of every 10 s (tests/test_k8s_alerts.py
        # scrapes the training gauges there).
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        # The apps deployed here (tests/test_finetune_serve.py, tests/test_promote_serve.py) stop only when their
        # module ends: no 30 s drain for a load balancer (serving_fixtures.QUICK_REPLICA_STOP_ENV).
        for key, value in QUICK_REPLICA_STOP_ENV.items():
            env.setenv(key, value)
        for attempt in range(2):
            try:
                start_local_ray(4, env_vars)
                break
            except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its raylet starts slowly
                ray.shutdown()
                if attempt or "timed out during startup" not in str(err):
                    raise
    _shared_ray["gcs_address"] = ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def _shared_ray_session():
    yield
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address == _shared_ray["gcs_address"]:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_shared_ray_session):
    """The session's local Ray, shared by every module that runs Ray Train or Tune in this process.

    Started by the first such module and kept for the next (a local Ray costs ~10 s to start and a few
    to stop); shut down at the end of the session. The modules that use it run one after another, after
    the modules that start a Ray of their own (pytest_collection_modifyitems).
    """
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _shared_ray["gcs_address"]:
        ray.shutdown()  # another module's Ray, left running
    if not ray.is_initialized():
        _start_shared_ray()
    yield


def pytest_collection_modifyitems(session, config, items):
    """Run the modules that share the session's Ray one after another, after the others (each group keeps
    its file order), so the shared Ray starts once."""
    def module(item):
        return getattr(getattr(item, "module", None), "__name__", None)

    shared_modules = {module(item) for item in items if SHARED_RAY_FIXTURE in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: module(item) in shared_modules)  # stable: file order within each group


# ---- process exit ----------------------------------------------------------------------------------
# The clean-clone run of 3a053c3 (2026-11-30) printed "588 passed" and then died of SIGSEGV in the
# interpreter's own finalization (no Python frame: pytest's faulthandler was already off), so `make test`
# failed with 139 after every test had passed. Not reproduced in a module run; the suspects are native
# threads (Ray's gRPC/core worker, torch, pyarrow) torn down in an arbitrary order once the session's Ray
# was shut down. The session's result is final by then: leave with its exit status without finalizing.
_session_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _session_exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session_exit_status and os.environ.get("RAYLM_TEST_FINALIZE") != "1":  # 1: finalize, to debug the crash
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_exit_status[-1])
