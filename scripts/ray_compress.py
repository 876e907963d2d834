#!/usr/bin/env python3
"""Runs one `rfid-moe compress` over a Ray cluster, unit by unit.

Usage:
    python scripts/ray_compress.py --address HOST:PORT [--num-gpus G] [--num-cpus C]
        [--max-retries R] [--units N] -- [compress] COMPRESS-ARGS...

COMPRESS-ARGS are exactly what `rfid-moe compress` takes (--model, --calibration, --out, the
budget, ...). The driver reads `rfid-moe compress ARGS --status` and runs what it names, each step
as a Ray task that starts the binary on whichever node Ray picks:

    plan          -> compress ARGS --plan [--units N]
    offer, apply  -> compress ARGS --unit I, for every pending unit I at once
    solve         -> compress ARGS --solve
    merge         -> compress ARGS --merge
    done          -> stop

The binary is RFID_MOE_BIN, else `rfid-moe` on PATH, resolved on the driver's machine: it, the
model, the calibration text, --out and --run must be at the same paths on every node (a shared
filesystem), and relative paths are taken from the driver's working directory, which must exist
on every node too. Every RFID_MOE_* variable of the driver's environment is passed to the steps
(and those of the worker's environment are dropped), so the steps see the driver's settings
whatever environment the Ray workers were started with.

Each step is idempotent and journalled by the binary, so a task Ray retries (its worker died, or
the step failed) continues where the previous attempt stopped, and running this driver again
after any failure continues from `--status`. A step's process dies with the Ray worker that
started it (PR_SET_PDEATHSIG), so a lost worker never leaves a unit running unseen next to its
retry.

Needs Ray Core only (scripts/ray-env.sh installs the pinned version). Exits 0 when the output
is complete, 1 when a step failed after its retries (its stderr is shown), 2 on a usage error.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ray

# What a failed step's message keeps of a long stderr: its start (an error followed by a
# backtrace, with RUST_BACKTRACE set) and its end (the last progress and the reason).
STDERR_HEAD_CHARS = 2000
STDERR_TAIL_CHARS = 6000
PR_SET_PDEATHSIG = 1


def die_with(parent_pid):
    """A preexec_fn: the child gets SIGKILL when the process that started it dies."""
    # Looked up before the fork: loading a library in the child of a threaded process (a Ray
    # worker) can deadlock on a lock another thread held at the fork.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal():
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(126)

    return set_death_signal


def run_binary(binary, args, cwd, env_vars):
    """Runs `binary compress ARGS` with the driver's RFID_MOE_* variables; returns the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFID_MOE_")}
    env.update(env_vars)
    return subprocess.run(
        [binary, "compress", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=die_with(os.getpid()),
    )


class StepFailed(Exception):
    """A step's process exited unsuccessfully; the message holds the end of its stderr."""


def node_name():
    """The node a task runs on: its address, and its Ray id for nodes sharing one host."""
    return f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def step(binary, args, cwd, env_vars, label):
    """The body of a step's Ray task: runs it, raises StepFailed when it fails."""
    if not os.path.isdir(cwd):
        raise StepFailed(
            f"{label}: the driver's working directory {cwd} does not exist on {node_name()}; "
            f"run the driver from a directory on the shared filesystem"
        )
    started = time.monotonic()
    try:
        result = run_binary(binary, args, cwd, env_vars)
    except OSError as e:
        raise StepFailed(f"{label}: cannot run {binary} on {node_name()}: {e}") from None
    seconds = time.monotonic() - started
    if result.returncode != 0:
        how = (
            f"killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"exit status {result.returncode}"
        )
        stderr = result.stderr.strip() or "(nothing on stderr)"
        if len(stderr) > STDERR_HEAD_CHARS + STDERR_TAIL_CHARS:
            stderr = f"{stderr[:STDERR_HEAD_CHARS]}\n[...]\n{stderr[-STDERR_TAIL_CHARS:]}"
        raise StepFailed(
            f"{label} failed on {node_name()} ({how}) after {seconds:.1f} s:\n{stderr}"
        )
    return {
        "seconds": seconds,
        "node": node_name(),
        "stdout": result.stdout,
    }


def parse_args(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    own, compress = argv[:split], argv[split + 1 :]
    if compress[:1] == ["compress"]:
        compress = compress[1:]
    parser = argparse.ArgumentParser(
        prog="ray_compress.py",
        usage="%(prog)s --address HOST:PORT [options] -- COMPRESS-ARGS...",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", required=True, help="the Ray cluster (HOST:PORT, or auto)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per step (default 0)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per step (default 1)")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="times Ray reruns a step that failed or lost its worker (default 3)",
    )
    parser.add_argument("--units", type=int, help="units to split the model into (plan only)")
    options, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (the compress arguments "
                     f"follow `--`)")
    if not compress:
        parser.error("the compress arguments must follow `--`")
    if options.units is not None and options.units < 1:
        parser.error("--units must be at least 1")
    if options.max_retries < 0:
        parser.error("--max-retries must be 0 or more")
    for flag in ("--plan", "--unit", "--unit-from-env", "--solve", "--merge", "--status"):
        if flag in compress:
            parser.error(f"{flag} is the driver's to pass; leave it out of the compress arguments")
    # Only the plan takes --units; given with every step it would reach the units too.
    if any(arg == "--units" or arg.startswith("--units=") for arg in compress):
        parser.error("give --units before `--` (the driver passes it to the plan step)")
    return options, compress


def find_binary():
    binary = os.environ.get("RFID_MOE_BIN") or shutil.which("rfid-moe")
    if not binary:
        print("error: no rfid-moe binary: set RFID_MOE_BIN or put rfid-moe on PATH",
              file=sys.stderr)
        sys.exit(2)
    return os.path.abspath(binary)


def read_status(binary, compress, env_vars):
    result = run_binary(binary, [*compress, "--status"], os.getcwd(), env_vars)
    if result.returncode != 0:
        print(f"error: `rfid-moe compress ... --status` failed:\n{result.stderr.rstrip()}",
              file=sys.stderr)
        sys.exit(1)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        print(f"error: `--status` printed no JSON object ({e}):\n{result.stdout}", file=sys.stderr)
        sys.exit(1)


def failure_text(label, error):
    """The message of a step's failure: StepFailed's own text, else Ray's (a lost worker)."""
    cause = getattr(error, "cause", None)
    # By name: the class comes back through pickling, not necessarily as the same object.
    if type(cause).__name__ == StepFailed.__name__:
        return str(cause)
    return f"{label} failed: {type(error).__name__}: {error}"


def run_wave(task, jobs, retries):
    """Runs (label, args) jobs at once; prints each as it ends; returns the failures' messages."""
    pending = {task.remote(args, label): label for label, args in jobs}
    failures = []
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        label = pending.pop(done)
        try:
            result = ray.get(done)
        except ray.exceptions.RayError as e:
            tries = retries + 1
            failures.append(f"{failure_text(label, e)}\n(tried {tries} time{'s' * (tries > 1)})")
            print(f"{label}: FAILED", flush=True)
            continue
        print(f"{label}: {result['seconds']:.1f} s on {result['node']}", flush=True)
        if result["stdout"].strip() and not label.startswith("unit"):
            print(result["stdout"].rstrip(), flush=True)
    return failures


def describe_cluster(options):
    """Prints the cluster's nodes; warns when no node has what one step asks for (Ray would
    wait for such a node without a word, unless an autoscaler adds one)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    total = ray.cluster_resources()
    print(f"Ray cluster at {options.address}: {len(nodes)} node(s), "
          f"{total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s); each step asks for "
          f"{options.num_cpus:g} CPU(s) and {options.num_gpus:g} GPU(s)", flush=True)
    fits = any(
        node.get("CPU", 0) >= options.num_cpus and node.get("GPU", 0) >= options.num_gpus
        for node in nodes
    )
    if not fits:
        print(f"warning: no node has the {options.num_cpus:g} CPU(s) and {options.num_gpus:g} "
              f"GPU(s) a step asks for; the steps wait until such a node joins the cluster",
              file=sys.stderr)


def main(argv):
    options, compress = parse_args(argv)
    binary = find_binary()
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("RFID_MOE_")}
    cwd = os.getcwd()

    ray.init(address=options.address, log_to_driver=False, logging_level="WARNING")
    # After ray.init, which installs a handler of its own that exits without a word. Ray ends a
    # driver's tasks when the driver exits, and each step's process dies with its task.
    signal.signal(signal.SIGTERM, on_sigterm)
    describe_cluster(options)

    @ray.remote(
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        max_retries=options.max_retries,
        retry_exceptions=True,
    )
    def compress_step(args, label):
        return step(binary, [*compress, *args], cwd, env_vars, label)

    started = time.monotonic()
    previous = None
    noted_units = False
    while True:
        status = read_status(binary, compress, env_vars)
        wave = status["next"]
        pending = status.get("pending", [])
        units = status.get("units")
        if wave == "done":
            break
        # A step that succeeded must move the run on; the same state again would loop forever.
        if previous == (wave, pending):
            print(f"error: the run at {status.get('run')} is still at `{wave}` (pending {pending}) "
                  f"after its steps succeeded", file=sys.stderr)
            return 1
        previous = (wave, pending)
        if wave != "plan" and options.units not in (None, units) and not noted_units:
            noted_units = True
            print(f"note: the run was planned with {units} units; --units {options.units} "
                  f"only applies to a new plan", file=sys.stderr)
        if wave == "plan":
            units_flag = ["--units", str(options.units)] if options.units else []
            jobs = [("plan", ["--plan", *units_flag])]
        elif wave in ("offer", "apply"):
            jobs = [(f"unit {i} ({wave})", ["--unit", str(i)]) for i in pending]
        elif wave in ("solve", "merge"):
            jobs = [(wave, [f"--{wave}"])]
        else:
            print(f"error: unknown step `{wave}` in the status of {status.get('run')}",
                  file=sys.stderr)
            return 1
        failures = run_wave(compress_step, jobs, options.max_retries)
        if failures:
            for failure in failures:
                print(f"\n{failure}", file=sys.stderr)
            print(f"\nThe finished steps are kept in {status.get('run')}; run the driver again to "
                  f"continue.", file=sys.stderr)
            return 1
    print(f"done: {status.get('run')} in {time.monotonic() - started:.1f} s", flush=True)
    return 0


TERMINATED = []


def on_sigterm(signum, frame):
    # KeyboardInterrupt rather than an exception of our own: Ray's waits pass only that one
    # through cleanly.
    TERMINATED.append(signum)
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("\ninterrupted; the finished steps are kept: run the driver again to continue",
              file=sys.stderr)
        sys.exit(143 if TERMINATED else 130)
