"""Process entry points that outlive the CLI call that started them.

python -m appliance.runner agent              the scheduler that starts queued jobs
python -m appliance.runner supervise JOB_ID   run one queued job in the foreground (debugging)
python -m appliance.runner run                a built-in job body (spec in APPLIANCE_JOB_SPEC)
python -m appliance.runner exec -- CMD...     a command job in a pod: its files fetched, then CMD
python -m appliance.runner tune STUDY_ID      the driver of one tuning study
python -m appliance.runner serve DEPLOYMENT   the model server of one deployment
python -m appliance.runner serve-worker DEPLOYMENT --bind H:P|--fd N   one of its workers
python -m appliance.runner serve-pod [--port P]   a k3s deployment's pod (APPLIANCE_SERVE_MODEL)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    sup = sub.add_parser("supervise")
    sup.add_argument("job_id")
    sub.add_parser("run")
    exec_ = sub.add_parser("exec")
    exec_.add_argument("argv", nargs=argparse.REMAINDER)
    agent = sub.add_parser("agent")
    agent.add_argument("--idle-exit", default=None)
    agent.add_argument("--wait-lock", action="store_true")
    serve = sub.add_parser("serve")
    serve.add_argument("deployment")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    tune = sub.add_parser("tune")
    tune.add_argument("study_id")
    worker = sub.add_parser("serve-worker")
    worker.add_argument("deployment")
    where = worker.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int)
    where.add_argument("--bind")
    pod = sub.add_parser("serve-pod")
    pod.add_argument("--host", default="0.0.0.0")  # noqa: S104 (the pod's own address)
    pod.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)

    if args.command == "run":
        from appliance.core.jobs import run_body

        return run_body()
    if args.command == "exec":
        from appliance.core.jobs import exec_command

        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            parser.error("exec: a command is required after --")
        return exec_command(argv)
    if args.command == "serve-pod":  # no home of its own: the model comes from the object store
        from appliance.core.k3s_serving import serve_pod

        return serve_pod(args.host, args.port)

    from appliance.core.context import Appliance

    app = Appliance.open(os.environ.get("APPLIANCE_HOME"))
    if args.command == "agent":
        from appliance.core.agent import run_agent
        from appliance.core.jobs import parse_duration

        idle = None if args.idle_exit is None else parse_duration(args.idle_exit, "--idle-exit")
        return run_agent(app, idle_exit=idle, wait_lock=args.wait_lock)
    if args.command == "supervise":
        from appliance.core.jobs import supervise

        state = supervise(app, args.job_id)
        return 0 if state == "succeeded" else 1
    if args.command == "tune":
        from appliance.core.studies import drive_study

        state = drive_study(app, args.study_id)
        return 0 if state in ("succeeded", "stopped", "running") else 1
    if args.command == "serve-worker":
        from appliance.core.serving import serve_worker

        return serve_worker(app, args.deployment, fd=args.fd, bind=args.bind)
    from appliance.core.serving import serve_deployment

    serve_deployment(app, args.deployment, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
