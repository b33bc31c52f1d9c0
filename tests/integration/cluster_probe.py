"""Ray job run by tests/integration/test_cluster_launcher.py on the 2-node cluster of cluster/local.yaml.

    python tests/integration/cluster_probe.py RESOURCE [RESOURCE ...]

For each custom resource (one per node kind), runs a task that needs it and reports the node it ran
on; then moves an object made on the last resource's node to the driver (a cross-node transfer).
Prints one line: `PROBE {"alive": [...], "ran_on": {...}, "resources": {...}, "transfer_sum": N}`.
"""

import json
import sys

import numpy as np
import ray


@ray.remote(num_cpus=1)
def node_ip() -> str:
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=1)
def make_block(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)  # 8 MB for n = 1M: goes through the object store, not inline


def main() -> None:
    ray.init()
    names = sys.argv[1:]
    ran_on = {name: ray.get(node_ip.options(resources={name: 1}).remote(), timeout=120) for name in names}
    block = ray.get(make_block.options(resources={names[-1]: 1}).remote(1_000_000), timeout=120)
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    print("PROBE " + json.dumps({"alive": alive, "ran_on": ran_on, "resources": ray.cluster_resources(),
                                 "transfer_sum": int(block.sum())}), flush=True)


if __name__ == "__main__":
    main()
