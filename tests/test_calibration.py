"""Measured choices stay right: a cached choice records the machine's speed when it was measured
and is measured again when that speed has changed or the entry is old (timings mocked)."""

import json
import math

import pytest
import torch

from lvd.common import calibration
from lvd.common.calibration import reference_speed as real_reference_speed

CPU = torch.device("cpu")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LVD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Machine:
    """A machine whose reference-matmul speed and engine timings the test sets."""

    def __init__(self, monkeypatch, speed: float):
        self.speed = speed
        self.times: dict[str, float] = {}
        self.timed: list[str] = []
        monkeypatch.setattr(calibration, "reference_speed", lambda device: self.speed)

    def measure(self, job, repeats):
        name = job()
        self.timed.append(name)
        return self.times[name]

    def choose(self):
        jobs = {"faiss": lambda: "faiss", "torch-fp32": lambda: "torch-fp32"}
        self.timed.clear()
        return calibration.choose("k-NN graph", {"rows": 8192}, jobs, device=CPU, measure=self.measure)


def test_a_choice_made_under_load_is_replaced_once_the_load_is_gone(fresh_cache, monkeypatch):
    # Busy: other jobs share the cores; Faiss's threads lose much more than the BLAS product.
    machine = Machine(monkeypatch, speed=40.0)
    machine.times = {"faiss": 0.19, "torch-fp32": 0.065}
    busy = machine.choose()
    assert busy.name == "torch-fp32" and not busy.cached and machine.timed
    assert machine.choose().cached and machine.timed == []  # still busy: the cached choice stands

    # Quiet: the reference runs 3.5x faster than when the choice was made, so it is re-checked.
    machine.speed = 140.0
    machine.times = {"faiss": 0.011, "torch-fp32": 0.016}
    quiet = machine.choose()
    assert quiet.name == "faiss" and not quiet.cached and sorted(machine.timed) == ["faiss", "torch-fp32"]
    again = machine.choose()
    assert again.name == "faiss" and again.cached and machine.timed == []  # the new choice replaced the old
    entry = next(iter(json.loads((fresh_cache / calibration.CACHE_FILE).read_text()).values()))
    assert entry["conditions"]["speed_gflops"] == [140.0, 140.0]
    assert "reference matmul 140/140 GFLOP/s" in again.describe()


def test_small_swings_keep_the_cached_choice(fresh_cache, monkeypatch):
    machine = Machine(monkeypatch, speed=100.0)
    machine.times = {"faiss": 1.0, "torch-fp32": 2.0}
    machine.choose()
    for speed in (100.0 / calibration.SPEED_TOLERANCE * 1.01, 100.0 * calibration.SPEED_TOLERANCE * 0.99):
        machine.speed = speed
        assert machine.choose().cached and machine.timed == []
    machine.speed = 100.0 * calibration.SPEED_TOLERANCE * 1.05
    assert not machine.choose().cached and machine.timed


@pytest.mark.parametrize("speed_now", [100.0, 40.0])
def test_load_that_changed_during_the_measurement_is_measured_again(fresh_cache, monkeypatch, speed_now):
    """The speed is read before and after the timings; a cached entry needs today's speed near both."""
    machine = Machine(monkeypatch, speed=100.0)
    machine.times = {"faiss": 1.0, "torch-fp32": 2.0}
    timed = machine.measure

    def measure_while_load_arrives(job, repeats):
        machine.speed = 40.0  # another job started while the candidates were being timed
        return timed(job, repeats)

    machine.measure = measure_while_load_arrives
    assert machine.choose().conditions["speed_gflops"] == [100.0, 40.0]
    machine.measure = timed
    machine.speed = speed_now  # near one of the two readings, not both
    assert not machine.choose().cached and len(machine.timed) == 2
    assert machine.choose().cached  # measured in steady conditions, it stands


def _age_entries(folder, seconds):
    path = folder / calibration.CACHE_FILE
    data = json.loads(path.read_text())
    for entry in data.values():
        entry["at"] -= seconds
    path.write_text(json.dumps(data))


def test_an_old_choice_is_measured_again(fresh_cache, monkeypatch):
    machine = Machine(monkeypatch, speed=100.0)
    machine.times = {"faiss": 1.0, "torch-fp32": 2.0}
    machine.choose()
    _age_entries(fresh_cache, calibration.MAX_AGE_S - 3600)
    assert machine.choose().cached
    _age_entries(fresh_cache, 7200)
    machine.times = {"faiss": 2.0, "torch-fp32": 1.0}
    renewed = machine.choose()
    assert renewed.name == "torch-fp32" and not renewed.cached


def test_an_entry_without_recorded_conditions_is_measured_again(fresh_cache, monkeypatch):
    """Entries written before conditions were recorded (the cache a busy first job left) are re-checked."""
    machine = Machine(monkeypatch, speed=100.0)
    machine.times = {"faiss": 1.0, "torch-fp32": 2.0}
    machine.choose()
    path = fresh_cache / calibration.CACHE_FILE
    data = json.loads(path.read_text())
    for entry in data.values():
        del entry["conditions"]
    path.write_text(json.dumps(data))
    assert not machine.choose().cached and len(machine.timed) == 2


def test_stale_because_names_the_reason():
    entry = {"at": 1000.0, "conditions": {"speed_gflops": [100.0, 90.0]}}
    assert calibration.stale_because(entry, {"speed_gflops": 95.0}, at=1000.0) is None
    assert "speed" in calibration.stale_because(entry, {"speed_gflops": 200.0}, at=1000.0)
    assert "days ago" in calibration.stale_because(entry, {"speed_gflops": 95.0}, at=1000.0 + 2 * calibration.MAX_AGE_S)
    assert "without a record" in calibration.stale_because({"at": 1000.0}, {"speed_gflops": 95.0}, at=1000.0)


class FakeClock:
    """Stands in for the `time` module inside calibration: jobs advance it by scripted durations."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def time(self):
        return 1e9 + self.now


def test_candidates_are_timed_by_the_median_of_interleaved_rounds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(calibration, "time", clock)
    order = []
    # Each round runs a candidate twice and times the second run (the first pays for the other
    # candidate's threads); "lucky" is once very fast but usually slow.
    durations = {"lucky": [9.0, 0.1, 9.0, 3.0, 9.0, 3.0], "steady": [9.0, 1.0, 9.0, 1.0, 9.0, 1.0]}

    def job(name):
        def run():
            order.append(name)
            clock.now += durations[name].pop(0)

        return run

    seconds = calibration.time_interleaved({"lucky": job("lucky"), "steady": job("steady")}, repeats=3)
    assert seconds == {"lucky": 3.0, "steady": 1.0}  # the best round would have picked "lucky"
    assert order == ["lucky", "lucky", "steady", "steady"] * 3  # interleaved rounds, each run twice


def test_the_reference_matmul_measures_without_touching_the_random_state():
    state = torch.random.get_rng_state()
    speed = real_reference_speed(CPU)
    assert math.isfinite(speed) and speed > 0
    assert torch.equal(state, torch.random.get_rng_state())
    conditions = calibration.current_conditions(CPU)
    assert set(conditions) == {"speed_gflops", "load_per_cpu"}


def test_without_a_cache_nothing_is_recorded(monkeypatch):
    monkeypatch.setenv("LVD_CACHE_DIR", "off")
    machine = Machine(monkeypatch, speed=100.0)
    machine.times = {"faiss": 1.0, "torch-fp32": 2.0}
    assert machine.choose().name == "faiss" and not machine.choose().cached
