"""The bare cost of one tensor-parallel step message: a Ray task per rank against a Ray compiled graph.

    PYTHONPATH=$PWD python benchmarks/tp_step_message.py [--ranks 2] [--steps 200]

Actors that do nothing but take the message (a pickled step of a few KB) and answer: the round trip
the executor pays per step on top of the ranks' forward, with no model and no compute to compete with.
"""

import argparse
import pickle
import time

import ray


@ray.remote
class Rank:
    def execute(self, message: bytes) -> int:
        return len(message)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    ray.init(num_cpus=args.ranks + 1, include_dashboard=False, log_to_driver=False)
    try:
        ranks = [Rank.remote() for _ in range(args.ranks)]
        message = pickle.dumps(list(range(2000)))  # ~10 KB, a decode step of a few hundred sequences
        ray.get([r.execute.remote(message) for r in ranks])

        start = time.perf_counter()
        for _ in range(args.steps):
            ray.get([r.execute.remote(message) for r in ranks])
        tasks_ms = (time.perf_counter() - start) / args.steps * 1e3

        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as step:
            graph = MultiOutputNode([r.execute.bind(step) for r in ranks]).experimental_compile()
        ray.get(graph.execute(message))
        start = time.perf_counter()
        for _ in range(args.steps):
            ray.get(graph.execute(message))
        graph_ms = (time.perf_counter() - start) / args.steps * 1e3
        graph.teardown()
        print(f"{args.ranks} ranks, {len(message)} B message: a Ray task per rank {tasks_ms:.3f} ms per step, "
              f"compiled graph {graph_ms:.3f} ms per step ({tasks_ms / graph_ms:.1f}x)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
