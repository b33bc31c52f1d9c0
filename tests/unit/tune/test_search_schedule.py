"""How many trials run at once, ASHA's schedule in training steps, and how a trial's end is read."""

import pytest
from ray.tune import Result

from musiclora.config import ASHAConfig, TrainConfig, TuneConfig
from musiclora.tune.search import _trial_row, asha_schedule, trials_at_once

TRAIN = {"data": {"shards_url": "s3://b/s"}, "run": {"storage_path": "s3://b/r", "adapters_url": "s3://b/a"},
         "model": {"base": "tiny"}}


def _train(**sections) -> TrainConfig:
    tree = {k: dict(v) for k, v in TRAIN.items()}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return TrainConfig.model_validate(tree)


def _tune(**fields) -> TuneConfig:
    return TuneConfig.model_validate({"train_config": "t.yaml", "search_space": {"adapter.r": {"choice": [4]}},
                                      **fields})


@pytest.mark.parametrize("resources, run, expected", [
    ({"CPU": 2.0}, {"num_workers": 2, "cpus_per_worker": 1}, 1),   # the 2-core machine: one trial at a time
    ({"CPU": 5.0}, {"num_workers": 2, "cpus_per_worker": 1}, 2),
    ({"CPU": 16.0}, {"num_workers": 2, "cpus_per_worker": 1}, 8),
    ({"CPU": 0.0}, {"num_workers": 2, "cpus_per_worker": 1}, 1),   # autoscaling head: one trial waits for nodes
    ({"CPU": 64.0, "GPU": 4.0}, {"num_workers": 2, "cpus_per_worker": 8, "use_gpu": True}, 2),
    ({"CPU": 64.0}, {"num_workers": 2, "cpus_per_worker": 8, "use_gpu": True}, 1),
])
def test_trials_at_once_fits_the_worker_groups_in_the_cluster(resources, run, expected):
    assert trials_at_once(_tune(), _train(run=run), resources) == expected


def test_max_concurrent_overrides_the_cluster_fit():
    assert trials_at_once(_tune(max_concurrent=3), _train(), {"CPU": 2.0}) == 3


def test_asha_schedule_is_derived_from_the_trial_in_steps():
    tiny = _train(optim={"max_steps": 12, "warmup_steps": 5}, run={"log_every": 2})
    assert asha_schedule(ASHAConfig(), tiny, "loss") == (6, 13)
    real = _train(optim={"max_steps": 5000, "warmup_steps": 100}, run={"log_every": 10, "eval_every": 250})
    assert asha_schedule(ASHAConfig(), real, "val_loss") == (750, 5001)  # past warm-up, on evaluation steps
    assert asha_schedule(ASHAConfig(), real, "loss") == (630, 5001)
    assert asha_schedule(ASHAConfig(reduction_factor=3), real, "val_loss") == (250, 5001)
    assert asha_schedule(ASHAConfig(grace_period=4, max_t=20), tiny, "loss") == (4, 20)


def test_trial_row_tells_finished_stopped_and_errored_apart():
    config = {"adapter.r": 8}
    finished = Result(metrics={"step": 12, "loss": 1.0, "done_training": 1, "adapter_url": "s3://a/t1",
                               "trial_id": "t1", "config": config}, checkpoint=None, error=None, path="/x/_trial_7a0b6_00000_0_adapter.r=8")
    stopped = Result(metrics={"step": 6, "loss": 2.0, "trial_id": "t2", "config": config}, checkpoint=None,
                     error=None, path="/x/_trial_7a0b6_00001_1_adapter.r=8")
    errored = Result(metrics={}, checkpoint=None, error=RuntimeError("worker group startup timed out"),
                     path="/x/_trial_7a0b6_00002_2_adapter.r=8")
    rows = [_trial_row(r) for r in (finished, stopped, errored)]
    assert [r["status"] for r in rows] == ["finished", "stopped", "errored"]
    assert [r["stopped_early"] for r in rows] == [False, True, False]
    assert rows[2]["trial_id"] == "7a0b6_00002" and "worker group startup timed out" in rows[2]["error"]
    assert rows[0]["adapter.r"] == 8
