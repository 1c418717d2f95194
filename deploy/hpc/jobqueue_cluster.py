"""Run a daskem job file on an HPC batch system (SLURM or PBS) with dask-jobqueue.

    pip install dask-jobqueue
    python deploy/hpc/jobqueue_cluster.py job.toml --system slurm --jobs 8 \
        --cores 8 --memory 32GiB --walltime 02:00:00 --queue normal --account myproj --tls

The script submits the workers as batch jobs, runs the job in this process
(run it from a login node inside `tmux`, or in its own small batch job), and
releases the workers at the end. Checkpoints go to the job's output folder,
so running it again after a wall-time kill resumes the fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_cluster(args: argparse.Namespace):
    """A dask-jobqueue cluster for ``args.system``."""
    try:
        from dask_jobqueue import PBSCluster, SLURMCluster
    except ImportError:
        sys.exit("this recipe needs dask-jobqueue: pip install dask-jobqueue")
    cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[args.system]
    kw = dict(
        cores=args.cores,
        processes=args.processes,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        local_directory=args.local_directory,
        log_directory="dask-logs",
        # distributed's statistical profiler slows daskem's chunk kernel by 8-15%
        job_script_prologue=["export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"],
        # the dashboard on the login node's loopback only: ssh -L 8787:127.0.0.1:PORT LOGIN_NODE
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
    )
    if args.account:
        kw["account"] = args.account
    if args.tls:
        # the scheduler in this process listens on the login node's network, reachable by
        # every user of the machine: with TLS only holders of this run's certificates get in
        try:
            from distributed import Security

            kw["security"] = Security.temporary()  # a new CA and certificate for this run
        except ImportError:
            sys.exit("--tls needs the cryptography package: pip install cryptography")
        kw["protocol"] = "tls://"
        # dask-jobqueue writes the certificates for the workers' batch scripts here
        shared = os.path.expanduser(args.shared_temp_directory)
        os.makedirs(shared, mode=0o700, exist_ok=True)
        kw["shared_temp_directory"] = shared
    return cls(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="daskem job file (TOML)")
    p.add_argument("--system", choices=["slurm", "pbs"], default="slurm")
    p.add_argument("--jobs", type=int, default=4, help="batch jobs of workers")
    p.add_argument("--cores", type=int, default=8, help="cores per batch job")
    p.add_argument("--processes", type=int, default=2, help="worker processes per batch job")
    p.add_argument("--memory", default="32GiB", help="memory per batch job")
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--local-directory", default="$TMPDIR", help="node-local scratch for spilling")
    p.add_argument(
        "--tls",
        action="store_true",
        help="encrypt and authenticate every connection with certificates made for this run "
        "(security=Security.temporary(), protocol tls://; needs the cryptography package)",
    )
    p.add_argument(
        "--shared-temp-directory",
        default="~/.daskem/jobqueue",
        metavar="DIR",
        help="with --tls: a folder on a file system the nodes share, for the certificates (mode 0700)",
    )
    args = p.parse_args(argv)

    from distributed import Client

    from daskem import jobs

    job = jobs.load_job(args.job)  # refuse a bad job file before asking for nodes
    with make_cluster(args) as cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        port = client.scheduler_info().get("services", {}).get("dashboard")
        print(f"dashboard on this node's 127.0.0.1:{port} (ssh -L 8787:127.0.0.1:{port} NODE)", file=sys.stderr)
        client.wait_for_workers(1, timeout=3600)
        job_id = jobs.new_job_id()
        jobs.register(job_id, job, mode="jobqueue")
        result = jobs.run_job(job, job_id, verbose=1)
    print(json.dumps({"id": job_id, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
