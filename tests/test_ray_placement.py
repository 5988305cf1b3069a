"""A placement the cluster cannot meet: a bounded wait, an error that says what was asked and
what the cluster has, and nothing left running (the local Ray and the reward workers stop)."""
import multiprocessing
import time

import pytest

from llmrl.loop import train
from llmrl.recipe import load_recipe

from test_e2e import QUICKSTART, TINY

pytest.importorskip("ray", reason="Ray not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.slow


def test_an_unplaceable_train_group_is_named_and_start_up_cleans_up(tmp_path):
    import ray

    from llmrl.distributed.ray_calls import ClusterError

    assert not ray.is_initialized()
    recipe = load_recipe(QUICKSTART, TINY + [
        "train.backend=deepspeed", "cluster.backend=ray", "cluster.num_cpus=2", "cluster.train_workers.count=2",
        "cluster.train_workers.num_cpus=8", "cluster.timeouts.placement_s=3", "rollout.weight_sync=broadcast",
        "reward.num_workers=1", f"output_dir={tmp_path}",
    ])
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"could not place 2 x \{'CPU': 8\.0\} for the train rank \(policy\) within 3 s; "
                                           r"the cluster has .*'CPU': 2\.0"):
        train(recipe)
    assert time.monotonic() - started < 60
    assert not ray.is_initialized()  # the Ray this run started is shut down
    assert not multiprocessing.active_children()  # and the reward workers are gone
