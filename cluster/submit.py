"""Submit a raylm run to a Ray cluster as a Ray job, optionally waiting for it with its logs streamed.

    python -m cluster.submit [--address http://HEAD:8265] [--wait] -- \\
        python -m training.pretrain --config configs/pretrain/tiny_cpu.yaml --set run.max_failures=3

A thin layer over Ray's `JobSubmissionClient` that adds what `ray job submit` leaves to the user: the
working dir is measured against the job server's 100 MiB upload cap before anything is sent (naming what
is large), the entrypoint's module and config are checked to exist, the auth token is found the way Ray
finds it, an auth refusal is explained, and the exit code is the job's outcome.

Address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the dashboard URL, http://HOST:8265).
Token: --token-file, else RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
Exit codes: 0 job succeeded (or was submitted, without --wait); 1 job failed; 2 bad arguments or
problems found before submitting; 3 cluster unreachable or auth refused; 4 job stopped; 130 interrupted
while waiting (the job keeps running).
"""

from __future__ import annotations

from cluster.requirements_check import check_requirements

check_requirements("cluster.submit", run_as_main=__name__ == "__main__")  # before any third-party import

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.auth import HOW_TO_GET_A_TOKEN, Token, auth_headers, find_token
from cluster.entrypoints import check_entrypoint
from cluster.workdir import effective_excludes, measure_working_dir

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
SUBMISSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SubmitError(Exception):
    """A problem that stops the submission; `exit_code` says which kind."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class JobRequest:
    """Everything `JobSubmissionClient.submit_job` needs, validated."""

    address: str
    entrypoint: str
    runtime_env: dict
    submission_id: str | None
    entrypoint_num_cpus: float | None
    entrypoint_num_gpus: float | None
    entrypoint_resources: dict[str, float] | None
    token: Token | None


# -------------------------------------------------------------------------------------------------
# parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.submit",
        description="Submit a raylm run to a Ray cluster (Ray job); the entrypoint goes after `--`.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", help="dashboard URL of the cluster, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=".", help="directory uploaded as the job's working_dir (default: current dir)")
    parser.add_argument("--no-working-dir", action="store_true", help="upload nothing: the code is already on the cluster (container image)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="gitignore-style pattern left out of the upload (repeatable)")
    parser.add_argument("--runtime-env", metavar="YAML", help="runtime_env YAML file merged under the options below")
    parser.add_argument("--runtime-env-json", metavar="JSON", help="runtime_env as JSON, merged under the options below")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default: Ray's, 0)")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    parser.add_argument("--entrypoint-resources", metavar="JSON", help='custom resources for the driver, e.g. \'{"raylm_head_node": 0.01}\'')
    parser.add_argument("--submission-id", help="job id to use (letters, digits, _ . -); default: Ray generates one")
    parser.add_argument("--token-file", help="file holding the cluster's auth token")
    parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its outcome")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up (exit 1, job stopped) after this many seconds")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command [args...]")
    args = parser.parse_args(argv)
    if args.entrypoint and args.entrypoint[0] == "--":
        args.entrypoint = args.entrypoint[1:]
    return args


# -------------------------------------------------------------------------------------------------
# validate + build


def resolve_address(explicit: str | None) -> str | None:
    """The job server address: explicit, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as Ray's CLI does)."""
    return explicit or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


def build_request(args: argparse.Namespace) -> JobRequest:
    """Validate the arguments and build the job request; raise SubmitError listing every problem."""
    problems: list[str] = []
    address = resolve_address(args.address)
    if not address:
        problems.append("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS (the dashboard URL)")

    entrypoint = " ".join(_quote(a) for a in args.entrypoint)
    runtime_env: dict = {}
    for source, loader in ((args.runtime_env, _load_yaml_file), (args.runtime_env_json, json.loads)):
        if source:
            try:
                loaded = loader(source)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                problems.append(f"runtime env {source!r}: {exc}")
                continue
            if not isinstance(loaded, dict):
                problems.append(f"runtime env {source!r}: must be a mapping, got {type(loaded).__name__}")
                continue
            shape = runtime_env_shape_problems(loaded)
            if shape:
                problems.extend(f"runtime env {source!r}: {p}" for p in shape)
                continue
            runtime_env.update(loaded)

    env_vars = dict(runtime_env.get("env_vars") or {})
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--env {item!r}: expected KEY=VALUE")
        else:
            env_vars[key] = value
    if env_vars:
        runtime_env["env_vars"] = env_vars

    working_dir = None if args.no_working_dir else Path(args.working_dir).expanduser().resolve()
    if working_dir is not None:
        if not working_dir.is_dir():
            problems.append(f"--working-dir {args.working_dir!r} is not a directory")
            working_dir = None
        else:
            excludes = effective_excludes(list(runtime_env.get("excludes") or []) + args.exclude)
            runtime_env["working_dir"] = str(working_dir)
            runtime_env["excludes"] = excludes
            too_large = measure_working_dir(working_dir, excludes).problem()
            if too_large:
                problems.append(too_large)
    if working_dir is not None:
        problems.extend(check_entrypoint(args.entrypoint, working_dir))
    elif not args.entrypoint:
        problems.append("entrypoint is empty: give the command after `--`")
    # Without a working dir the code is already on the cluster (an image): nothing local to check it against.

    resources = None
    if args.entrypoint_resources:
        try:
            resources = json.loads(args.entrypoint_resources)
            if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
                raise ValueError("expected a JSON object of numbers")
        except ValueError as exc:
            problems.append(f"--entrypoint-resources: {exc}; e.g. '{{\"raylm_head_node\": 0.01}}'")
            resources = None
    for flag, value in (("--entrypoint-num-cpus", args.entrypoint_num_cpus), ("--entrypoint-num-gpus", args.entrypoint_num_gpus)):
        if value is not None and value < 0:
            problems.append(f"{flag}: {value} must be >= 0")
    if args.submission_id and not SUBMISSION_ID_RE.match(args.submission_id):
        problems.append(f"--submission-id {args.submission_id!r}: use letters, digits, '_', '.', '-' (max 128)")

    token = None
    try:
        token = find_token(args.token_file)
    except FileNotFoundError as exc:
        problems.append(str(exc))

    if problems:
        raise SubmitError("\n".join(f"  - {p}" for p in problems), EXIT_INVALID)
    return JobRequest(
        address=address,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_resources=resources,
        token=token,
    )


def runtime_env_shape_problems(runtime_env: dict) -> list[str]:
    """Problems with the runtime_env keys this tool reads or merges (env_vars, excludes, working_dir).

    Other keys (pip, py_modules, ...) go to Ray as they are; Ray validates them on the cluster.
    """
    problems = []
    env_vars = runtime_env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            problems.append(
                f"env_vars must be a mapping of NAME: value, got {type(env_vars).__name__} {env_vars!r}; "
                'e.g. {"env_vars": {"A": "1"}} (or pass --env A=1)'
            )
        else:
            for name, value in env_vars.items():
                if not isinstance(value, str):
                    problems.append(
                        f"env_vars.{name}: value must be a string, got {type(value).__name__} {value!r}; quote it, e.g. \"{name}\": \"{value}\""
                    )
    excludes = runtime_env.get("excludes")
    if excludes is not None and not (isinstance(excludes, list) and all(isinstance(e, str) for e in excludes)):
        problems.append(f'excludes must be a list of gitignore-style patterns, got {excludes!r}; e.g. {{"excludes": ["runs/"]}}')
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None and not isinstance(working_dir, str):
        problems.append(f"working_dir must be a path or URI string, got {working_dir!r}; or use --working-dir")
    return problems


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _load_yaml_file(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------------------------
# run


def connect(address: str, token: Token | None):
    """A JobSubmissionClient for `address`, with auth refusals turned into a SubmitError that explains them."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as exc:  # noqa: BLE001 - Ray raises plain RuntimeError/ConnectionError here
        raise explain_connection_error(address, token, exc) from None


def explain_connection_error(address: str, token: Token | None, exc: Exception) -> SubmitError:
    text = str(exc)
    if "401" in text or "Authentication required" in text or "Missing authentication token" in text:
        return SubmitError(
            f"the cluster at {address} refused the request: it has token auth on and no token was sent. Fix: {HOW_TO_GET_A_TOKEN}",
            EXIT_UNREACHABLE,
        )
    if "403" in text or "Invalid authentication token" in text or "invalid or incorrect" in text:
        return SubmitError(
            f"the cluster at {address} refused the token from {token.source if token else '?'}: it is not this cluster's token. "
            f"Fix: {HOW_TO_GET_A_TOKEN}",
            EXIT_UNREACHABLE,
        )
    return SubmitError(
        f"cannot reach the Ray job server at {address}: {text.splitlines()[0] if text else exc.__class__.__name__}. "
        "Fix: check the address (the dashboard URL, port 8265 by default; tunnel it with `ray dashboard cluster.yaml` "
        "or `kubectl port-forward`) and that the cluster is up",
        EXIT_UNREACHABLE,
    )


def submit(request: JobRequest):
    """Submit the job; return (client, submission_id)."""
    client = connect(request.address, request.token)
    try:
        job_id = client.submit_job(
            entrypoint=request.entrypoint,
            runtime_env=request.runtime_env or None,
            submission_id=request.submission_id,
            entrypoint_num_cpus=request.entrypoint_num_cpus,
            entrypoint_num_gpus=request.entrypoint_num_gpus,
            entrypoint_resources=request.entrypoint_resources,
            metadata={"submitted_by": "raylm cluster.submit"},
        )
    except Exception as exc:  # noqa: BLE001
        error = explain_connection_error(request.address, request.token, exc)
        if error.exit_code == EXIT_UNREACHABLE and "cannot reach" in str(error):
            raise SubmitError(f"the job server at {request.address} rejected the job: {exc}", EXIT_INVALID) from None
        raise error from None
    return client, job_id


def wait_for_job(client, job_id: str, timeout_s: float | None, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status name."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        client.stop_job(job_id)
        print(f"\ncluster.submit: --timeout {timeout_s:g} s reached; stopped job {job_id}", file=sys.stderr)
    # The log stream can close a moment before the status turns terminal.
    deadline = time.monotonic() + 60
    status = client.get_job_status(job_id)
    while not JobStatus(status).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    return JobStatus(status).value


def exit_code_for(status: str) -> int:
    return {"SUCCEEDED": EXIT_SUCCEEDED, "STOPPED": EXIT_STOPPED}.get(status, EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        request = build_request(args)
        client, job_id = submit(request)
    except SubmitError as exc:
        kind = "problems found before submitting" if exc.exit_code == EXIT_INVALID else "submission refused"
        print(f"cluster.submit: {kind}:\n{exc}" if "\n" in str(exc) else f"cluster.submit: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"cluster.submit: submitted job {job_id} to {request.address}", file=sys.stderr)
    if not args.wait:
        print(f"  follow it: RAY_ADDRESS={request.address} ray job logs -f {job_id}", file=sys.stderr)
        print(job_id)
        return EXIT_SUCCEEDED
    try:
        status = wait_for_job(client, job_id, args.timeout)
    except KeyboardInterrupt:
        print(f"\ncluster.submit: stopped waiting; job {job_id} keeps running (stop it: ray job stop {job_id})", file=sys.stderr)
        return EXIT_INTERRUPTED
    info = client.get_job_info(job_id)
    print(f"cluster.submit: job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""), file=sys.stderr)
    return exit_code_for(status)


if __name__ == "__main__":
    sys.exit(main())
