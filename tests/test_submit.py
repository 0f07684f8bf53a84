"""`lvd submit`'s pieces: torchrun's variables from Slurm's (through submitit), and the job's shape."""

import argparse

import pytest

from lvd.common.ranks import TORCHRUN_VARIABLES, export_job_environment, job_variables, launch_variables
from lvd.curate.submit import SubmitError, Task, add_arguments, make_executor

SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "16",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu-[017-018]",
}


def test_a_slurm_task_becomes_a_torchrun_rank(monkeypatch):
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    got = job_variables()
    assert set(got) == set(TORCHRUN_VARIABLES)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    assert got["MASTER_ADDR"] == "gpu-017"  # the job's first node, from Slurm's compressed node list
    assert 20000 <= int(got["MASTER_PORT"]) < 60000
    monkeypatch.setenv("SLURM_PROCID", "0")  # another task of the same job meets at the same place
    monkeypatch.setenv("SLURM_LOCALID", "0")
    other = job_variables()
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (got["MASTER_ADDR"], got["MASTER_PORT"])
    environ = {"MASTER_PORT": "12345"}
    export_job_environment(environ)
    assert environ["MASTER_PORT"] == "12345" and environ["RANK"] == "0" and environ["WORLD_SIZE"] == "16"


def test_the_rendezvous_port_follows_the_job():
    ports = {
        launch_variables(rank=0, world=8, local_rank=0, nodes=1, master_addr="h", job_id=str(j))["MASTER_PORT"]
        for j in range(50)
    }
    assert len(ports) > 40


def _args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--overwrite", action="store_true")
    add_arguments(parser)
    return parser.parse_args(["cfg.yaml", *argv])


def test_the_job_has_one_task_per_gpu_by_default(tmp_path):
    executor = make_executor(_args("--cluster", "local", "--gpus-per-node", "2", "--time", "30"), str(tmp_path))
    assert executor.cluster == "local"
    assert executor._executor.parameters["tasks_per_node"] == 2
    assert executor._executor.parameters["timeout_min"] == 30
    with pytest.raises(SubmitError, match="one node"):
        make_executor(_args("--cluster", "local", "--nodes", "2"), str(tmp_path))


def test_a_requeued_task_resumes_instead_of_overwriting():
    task = Task("run", "/abs/cfg.yaml", ["seed=1", "overwrite=true"], "dedup")
    again = task.checkpoint().function
    assert again == Task("run", "/abs/cfg.yaml", ["seed=1"], "dedup")


def test_ranks_of_one_host_share_its_cores_unless_bound_to_their_own(monkeypatch):
    from lvd.common.ranks import Ranks
    from lvd.curate import workers

    monkeypatch.setattr(workers.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert workers.rank_workers("auto", Ranks(0, 8)) == 4  # torchrun: 4 ranks on 16 cores
    assert workers.rank_workers(2, Ranks(0, 8)) == 1
    assert workers.rank_workers(0, Ranks(0, 8)) == 0  # in-process stays in-process
    assert workers.rank_workers("auto", Ranks()) == 16
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert workers.rank_workers("auto", Ranks(0, 8)) == 4  # a Slurm task bound to its 4 cores
