"""`lvd submit CONFIG --nodes N --gpus-per-node G`: the pipeline (or pretraining) as a Slurm job, through submitit.

DINO's README launches its training this way (`run_with_submitit.py --nodes 2 --ngpus 8`, with
submitit), and so do dinov2 and dinov3. The job has N x T tasks (T tasks per node, one per GPU by
default); each task turns Slurm's description of itself into torchrun's variables
(`lvd.common.ranks.export_job_environment`) and runs `lvd.curate.run.run_pipeline` or
`lvd pretrain` as a rank of one process group. A job that reaches its time limit or is
preempted is requeued by submitit and resumes from its finished parts. Without Slurm, `--cluster
local` runs the same tasks as processes on this machine (submitit's local executor).

The sbatch equivalent (README, "Scale"):

    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=80
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node 8 --rdzv-id "$SLURM_JOB_ID" \\
        --rdzv-backend c10d --rdzv-endpoint "$head:29500" -m lvd.curate.run CONFIG
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lvd.common.errors import UserError

log = logging.getLogger(__name__)


class SubmitError(UserError):
    """submitit is missing, or the job could not be submitted or failed."""


@dataclass
class Task:
    """What every task of the job runs (pickled by submitit; a requeued job runs it again)."""

    command: str  # "run" (the pipeline) or "pretrain"
    config: str
    overrides: list[str] = field(default_factory=list)
    until: str | None = None

    def __call__(self):
        from lvd.common.logs import setup_logging
        from lvd.common.ranks import export_job_environment
        from lvd.curate.config import load_config

        export_job_environment()
        if self.command == "pretrain":
            from lvd.pretrain.train import run_pretrain

            cfg = load_config(self.config, self.overrides, defaults="pretrain")
            setup_logging(cfg.get("log_level", "INFO"))
            return str(run_pretrain(cfg))
        from lvd.curate.run import run_pipeline

        cfg = load_config(self.config, self.overrides)
        setup_logging(cfg.log_level)
        return {name: str(folder) for name, folder in run_pipeline(cfg, self.until).items()}

    def checkpoint(self, *args, **kwargs):
        """submitit's hook at a time limit or preemption: requeue the task, which resumes from the
        finished parts (an `overwrite=true` of the first submission is not repeated)."""
        import submitit

        resume = [o for o in self.overrides if o.replace(" ", "") != "overwrite=true"]
        return submitit.helpers.DelayedSubmission(Task(self.command, self.config, resume, self.until))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's shape and Slurm options (CONFIG and overrides come from the command line parser)."""
    from lvd.curate.run import STAGES

    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: a CPU job)")
    parser.add_argument(
        "--tasks-per-node", type=int, default=None, help="ranks per node (none: one per GPU, or 1 without GPUs)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (decoding workers)")
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node in GiB (none: Slurm's)")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--constraint", default=None, help="Slurm constraint (e.g. volta32gb)")
    parser.add_argument("--time", type=int, default=2880, help="time limit in minutes; the job is requeued past it")
    parser.add_argument("--name", default="lvd", help="job name")
    parser.add_argument("--folder", default=None, help="submitit's logs and pickles (none: RUN_DIR/submitit/%%j)")
    parser.add_argument(
        "--cluster",
        choices=("auto", "slurm", "local"),
        default="auto",
        help="auto: Slurm where sbatch is found, else this machine (submitit's local executor, one node)",
    )
    parser.add_argument("--pretrain", action="store_true", help="run `lvd pretrain CONFIG` instead of the pipeline")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop the pipeline after this stage")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print what every task returned")


def _config_path(spec: str) -> str:
    """A config file as an absolute path (tasks may start elsewhere); a packaged name as it is."""
    return str(Path(spec).resolve()) if Path(spec).is_file() else spec


def make_executor(args, run_dir: str):
    """A submitit executor with the job's shape: Slurm's, or the local one."""
    try:
        import submitit
    except ImportError:
        raise SubmitError("lvd submit needs submitit: pip install 'lvd[submit]' (or pip install submitit)") from None
    if args.cluster == "local" and args.nodes != 1:
        raise SubmitError(f"--cluster local runs one node; got --nodes {args.nodes}")
    folder = args.folder or os.path.join(run_dir, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=None if args.cluster == "auto" else args.cluster)
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    slurm = {"slurm_partition": args.partition, "slurm_constraint": args.constraint}
    executor.update_parameters(
        name=args.name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}),
        **{key: value for key, value in slurm.items() if value is not None},
    )
    return executor


def submit(args):
    """Submit the job; with --wait, wait for it. Returns the submitit job."""
    from lvd.curate.config import load_config

    overrides = [*args.overrides, *(["overwrite=true"] if args.overwrite else [])]
    defaults = "pretrain" if args.pretrain else "default"
    cfg = load_config(args.config, overrides, defaults=defaults)  # a bad config fails here, not on the cluster
    task = Task("pretrain" if args.pretrain else "run", _config_path(args.config), overrides, args.until)
    executor = make_executor(args, str(cfg.run_dir))
    job = executor.submit(task)
    print(f"submitted job {job.job_id} ({executor.cluster}): {args.nodes} node(s), logs in {job.paths.folder}")
    if args.wait:
        try:
            results = job.results()
        except Exception as exc:  # submitit's FailedJobError carries the task's traceback
            raise SubmitError(f"job {job.job_id} failed; see {job.paths.stderr}: {str(exc).strip()[-2000:]}") from None
        print(f"job {job.job_id} finished: {results[0]}")
    return job


__all__ = ["Task", "add_arguments", "make_executor", "submit"]
