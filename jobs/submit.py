"""``dr2 submit``: run ``dr2 restore`` or ``dr2 nightly`` on a Ray cluster through Ray Jobs.

    dr2 submit [--address http://HEAD:8265] [--follow] -- restore SRC DST [restore options]
    dr2 submit --status ID | --logs ID | --stop ID

What travels with a job (its ``runtime_env``):

* ``working_dir``: this project's root, minus ``.venv``, ``.git``, ``demo``, ``out``, ``build`` and caches (a few
  MB). The entrypoint ``python -m jobs.cli ...`` runs in it, and Ray puts it on every worker's ``sys.path``, so
  the code that runs is the code you submitted, even on nodes where an older version is installed.
* ``pip`` (``--deps pip``, the default): the project's runtime dependencies from ``pyproject.toml``, each pinned
  to the version installed where you submit (what you tested). ``ray`` and ``torch`` are left out on purpose: Ray
  must stay the cluster's own 2.60.0, and torch must stay the node's CUDA build (a pip install would pull a
  different wheel). Ray builds the pip environment on top of the node's site-packages, so both stay visible.
  The MTCNN weights come from ``facenet-pytorch``, which must be installed with ``--no-deps`` (its metadata pins
  an old torch): that cannot be expressed in a runtime_env, so nodes get it from their image or setup commands
  (``cluster.yaml``, the KubeRay image). ``--deps installed`` skips pip when the nodes already have everything.
* ``env_vars``: what ``--env KEY=VALUE`` gives (e.g. ``AWS_ENDPOINT_URL``). Credentials are never shipped:
  a runtime_env is stored in the cluster and shown on the dashboard. Nodes get S3 access from their role. And
  ``RAY_JOB_STOP_WAIT_TIME_S`` (unless ``--env`` sets it): ``--stop`` has Ray's job manager send the entrypoint
  SIGTERM, which the job handles as Ctrl-C (pipeline/runner/stopping.py: the commits under way finish within the job's
  ``--stop-grace``, its lease is released), and SIGKILL it after this many seconds, 3 by default in Ray 2.60: too
  soon for a commit under way. Ray reads it in the job's supervisor actor, which runs in the job's runtime_env;
  it is set to the grace period + :data:`STOP_MARGIN_S`.

Idempotence: the submission id is ``dr2-`` + the first 16 hex digits of the sha-256 of the normalized job
arguments (and ``--key``). Ray refuses a second job with an existing id ("already exists"); ``dr2 submit`` then
attaches to the job that has it instead of starting a second copy. To run the same arguments again (a nightly
job from cron), pass a different ``--key``, e.g. ``--key $(date +%F)``.

Exit codes: 0 submitted (or, with ``--follow``, SUCCEEDED); 1 the followed job FAILED or was STOPPED; 2 the
job could not be submitted (no dashboard at the address, bad arguments, authentication).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import shlex
import socket
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

JOB_COMMANDS = ("restore", "nightly")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns, relative to the project root
EXCLUDES = [".venv/", ".git/", "demo/", "out/", "build/", "dist/", "**/__pycache__/", ".mypy_cache/",
            ".ruff_cache/", ".pytest_cache/", "*.egg-info/", "*.pyc"]
NOT_FROM_PIP = {"ray", "torch"}  # the cluster's own: see the module docstring
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray 2.60's job supervisor: seconds between SIGTERM and SIGKILL on stop
STOP_MARGIN_S = 15  # past the job's grace period: its last words (lease release) and Python's exit
Deps = Literal["pip", "installed"]


class SubmitError(RuntimeError):
    """Something a person can fix: an unreachable dashboard, authentication, a bad job line."""


# --- what a job carries ------------------------------------------------------------------------------


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pinned_requirements(pyproject: Path) -> list[str]:
    """``[project].dependencies`` of ``pyproject``, minus ray and torch, each pinned to the installed version
    (``name[extras]==x.y.z``); a dependency not installed here keeps its range from pyproject."""
    from packaging.requirements import Requirement

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out: list[str] = []
    for spec in deps:
        req = Requirement(spec)
        if req.name.lower() in NOT_FROM_PIP:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        try:
            out.append(f"{req.name}{extras}=={importlib.metadata.version(req.name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(spec)
    return out


def build_runtime_env(root: Path, *, deps: Deps = "pip", env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of a dr2 job: this project as working_dir (minus excludes), pinned pip deps, env vars."""
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    if deps == "pip":
        env["pip"] = {"packages": pinned_requirements(root / "pyproject.toml"), "pip_check": False}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def normalize_job_argv(job_argv: Sequence[str]) -> list[str]:
    """``--opt=value`` -> ``--opt value``; everything else as given (order matters to argparse, so it is kept)."""
    out: list[str] = []
    for tok in job_argv:
        if tok.startswith("--") and "=" in tok:
            out.extend(tok.split("=", 1))
        else:
            out.append(tok)
    return out


def submission_id(job_argv: Sequence[str], key: str = "") -> str:
    """``dr2-<16 hex>``: the same job arguments (and key) always give the same id."""
    blob = json.dumps({"argv": normalize_job_argv(job_argv), "key": key}, separators=(",", ":"))
    return "dr2-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def entrypoint(job_argv: Sequence[str], python: str = "python") -> str:
    return shlex.join([python, "-m", "jobs.cli", *job_argv])


def stop_wait_s(job_argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    """Seconds Ray's job manager should give the job between SIGTERM and SIGKILL (``dr2 submit --stop``): the job
    line's ``--stop-grace`` (or its default) + :data:`STOP_MARGIN_S`; ``parser`` is the ``dr2`` parser."""
    from pipeline.config import PipelineConfig

    grace = PipelineConfig().stop_grace
    with contextlib.suppress(SystemExit):  # a job line this client cannot parse: the default grace period
        grace = float(getattr(parser.parse_args(list(job_argv)), "stop_grace", grace))
    return int(math.ceil(grace)) + STOP_MARGIN_S


def check_job_argv(job_argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Refuse an empty or unknown job line here, before anything reaches the cluster; parse ``restore`` with the
    real ``dr2`` parser (passed in: the parser imports this module for its options) so that a typo fails now
    instead of on the cluster."""
    argv = list(job_argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in JOB_COMMANDS:
        raise SubmitError(f"give the job after `--`: `dr2 submit -- restore SRC DST ...` or "
                          f"`dr2 submit -- nightly SRC DST --state URI ...` (got {shlex.join(argv) or 'nothing'})")
    commands = {c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices}
    if argv[0] not in commands:
        return argv  # a client without this command yet: the cluster's code parses it
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the reason
        raise SubmitError(f"the job line does not parse: {shlex.join(argv)}") from e
    return argv


# --- talking to the cluster --------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS")
            or (os.environ.get("RAY_ADDRESS", "") if "://" in os.environ.get("RAY_ADDRESS", "") else "")
            or DEFAULT_ADDRESS)


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; we resolve it ourselves."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the dashboard at ``address``, or a :class:`SubmitError` saying what to do."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _explicit_address():
            return JobSubmissionClient(url)
    except AuthenticationError as e:
        raise SubmitError(
            f"the Ray cluster at {url} uses token authentication and refused us: set RAY_AUTH_MODE=token and the "
            f"cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token) ({e})") from e
    except (ConnectionError, OSError) as e:
        raise SubmitError(f"no Ray dashboard at {url}: start one with `ray start --head --dashboard-host 127.0.0.1` "
                          "or pass --address http://HEAD:8265") from e
    except RuntimeError as e:
        if "auth" in str(e).lower() or "token" in str(e).lower():
            raise SubmitError(f"the Ray cluster at {url} needs a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                              f"({e})") from e
        raise


def submit(client: Any, job_argv: Sequence[str], *, key: str = "", deps: Deps = "pip",
           env_vars: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, python: str = "python",
           root: Path | None = None) -> tuple[str, bool]:
    """Submit the job, or attach to the job that already has its id. Returns (submission id, attached)."""
    sid = submission_id(job_argv, key)
    try:
        client.submit_job(
            entrypoint=entrypoint(job_argv, python),
            submission_id=sid,
            runtime_env=build_runtime_env(root or project_root(), deps=deps, env_vars=env_vars),
            metadata={"dr2_argv": json.dumps(list(job_argv)), "dr2_key": key, "submitted_from": socket.gethostname()},
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        return sid, True
    return sid, False


def job_exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1 if status in ("FAILED", "STOPPED") else 2


def wait_for_end(client: Any, sid: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(sid))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def follow(client: Any, sid: str, out: IO[str]) -> str:
    """Stream the job's logs to ``out`` until it ends; its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream closed early (dashboard restart): fall back to polling
        print(f"dr2 submit: log stream of {sid} ended early ({e}); waiting for the job to end", file=sys.stderr)
    return wait_for_end(client, sid)


def describe(client: Any, sid: str) -> str:
    info = client.get_job_info(sid)
    parts = [f"{sid}: {info.status}"]
    if info.start_time:
        parts.append(f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.start_time / 1000))}")
    if info.end_time:
        parts.append(f"ended {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.end_time / 1000))}")
    if info.message:
        parts.append(str(info.message))
    parts.append(f"entrypoint: {info.entrypoint}")
    return "; ".join(parts)


# --- the command -------------------------------------------------------------------------------------


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help=(
        f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else {DEFAULT_ADDRESS})"))
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit with its status")
    p.add_argument("--key", default="", help=(
        "mixed into the submission id: the same job line with a new key is a new job (e.g. --key $(date +%%F))"))
    p.add_argument("--deps", choices=("pip", "installed"), default="pip", help=(
        "pip: install the project's pinned dependencies (not ray, not torch) in the job's runtime_env; installed: "
        "the nodes already have them (cluster.yaml setup, a built image) (default: pip)"))
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job (repeatable); never put credentials here")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--python", default="python", help="the Python that runs the entrypoint on the cluster")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--status", metavar="ID", help="print the status of job ID")
    q.add_argument("--logs", metavar="ID", help="print the logs of job ID (with --follow: stream them)")
    q.add_argument("--stop", metavar="ID", help="stop job ID")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- restore|nightly ARGS...")


def _env_vars(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise SubmitError(f"--env wants KEY=VALUE, got {pair!r}")
        out[k] = v
    return out


def cmd_submit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``dr2 submit``; ``parser`` is the ``dr2`` parser that checks the job line."""
    try:
        return _cmd_submit(args, parser)
    except SubmitError as e:
        print(f"dr2 submit: {e}", file=sys.stderr)
        return 2


def _cmd_submit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    query = args.status or args.logs or args.stop
    job_argv = [] if query else check_job_argv(args.job, parser)
    if query and [t for t in args.job if t != "--"]:
        raise SubmitError("--status/--logs/--stop take a job id and no job line")
    env_vars = _env_vars(args.env)
    if job_argv:
        env_vars.setdefault(STOP_WAIT_ENV, str(stop_wait_s(job_argv, parser)))
    client = connect(args.address)
    if query:
        try:
            if args.stop:
                stopped = client.stop_job(args.stop)
                print(f"{args.stop}: {'stop requested' if stopped else 'already ended'}")
                return 0
            if args.logs:
                if args.follow:
                    return job_exit_code(follow(client, args.logs, sys.stdout))
                sys.stdout.write(client.get_job_logs(args.logs))
                return 0
            print(describe(client, args.status))
            return 0
        except RuntimeError as e:
            raise SubmitError(f"job {query}: {e}") from e
    sid, attached = submit(client, job_argv, key=args.key, deps=args.deps, env_vars=env_vars,
                           entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                           python=args.python)
    status = str(client.get_job_status(sid))
    if attached:
        print(f"dr2 submit: job {sid} already exists ({status}): attached to it instead of starting a second copy"
              + ("; pass --key to run the same job line again" if status in TERMINAL else ""))
    else:
        print(f"dr2 submit: submitted {sid} ({status})")
    url = resolve_address(args.address)
    print(f"  logs:   dr2 submit --address {url} --logs {sid} [--follow]\n"
          f"  status: dr2 submit --address {url} --status {sid}\n"
          f"  stop:   dr2 submit --address {url} --stop {sid}")
    if not args.follow:
        return 0
    final = follow(client, sid, sys.stdout)
    print(f"dr2 submit: job {sid} {final}")
    return job_exit_code(final)
