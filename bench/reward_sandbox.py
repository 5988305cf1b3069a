"""What the reward sandbox costs: time per reward call and worker start-up, sandbox on vs off.

    python bench/reward_sandbox.py [--calls 512] [--repeats 15] [--starts 20]

Per call: one worker scores `--calls` trajectories with the built-in `gsm8k` and `math` graders
(the worker is started and warmed first, so only calls are timed); the median of `--repeats`
batches, divided by the number of calls, the settings taking turns within each repeat.
In-process scoring (num_workers=0) is printed as the floor. Start-up: the median time from asking for a worker to its ready message, over `--starts`
workers (with the sandbox on: the shim, the namespaces, the read-only remount, the PID
namespace's init and the uid or capability drop).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

from llmrl.reward import RewardComputer, RewardConfig
from llmrl.reward.pool import _WorkerPool
from llmrl.types import Span, Task, Trajectory

GRADERS = {
    "gsm8k": lambda i: (f"Adding up, the total is {i % 97}.\n#### {i % 97}", str(i % 89)),
    "math": lambda i: (rf"So the answer is $\boxed{{\frac{{{i % 7 + 1}}}{{2}}}}$.", rf"\frac{{{i % 5 + 1}}}{{2}}"),
}


def trajectories(grader: str, count: int) -> list[Trajectory]:
    batch = []
    for i in range(count):
        completion, answer = GRADERS[grader](i)
        task = Task(task_id=str(i), messages=[{"role": "user", "content": "q"}], answer=answer)
        batch.append(Trajectory(
            task=task, token_ids=[1, 2, 3, 4], spans=[Span("prompt", 0, 2), Span("policy", 2, 4)],
            rollout_logprobs=[0.0] * 4, finish_reason="stop", group_id=0, completion_text=completion,
        ))
    return batch


def per_call_us(grader: str, calls: int, repeats: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median microseconds per call for in-process, sandbox off and sandbox on; the three are
    measured in turn within each repeat, so load on the machine hits them alike."""
    batch = trajectories(grader, calls)
    settings = {"in-process": {"num_workers": 0}, "off": {"sandbox": False}, "on": {"sandbox": True}}
    computers = {name: RewardComputer(RewardConfig(functions=[grader], **kw)) for name, kw in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in settings}
    try:
        for rewards in computers.values():
            rewards.score(batch[:8])  # start and warm the worker (imports, caches)
        for _ in range(repeats):
            for name, rewards in computers.items():
                start = time.perf_counter()
                rewards.score(batch)
                times[name].append(time.perf_counter() - start)
                assert rewards.metrics()["reward/failures"] == 0
        guarantees = computers["on"].sandbox_guarantees
    finally:
        for rewards in computers.values():
            rewards.close()
    return {name: statistics.median(values) / calls * 1e6 for name, values in times.items()}, guarantees


def start_ms(starts: int, sandbox: bool) -> float:
    config = RewardConfig(functions=["gsm8k"], sandbox=sandbox)
    pool = _WorkerPool(["gsm8k"], 1, config.sandbox_settings())
    times = []
    try:
        for _ in range(starts):
            start = time.perf_counter()
            worker = pool._start()  # noqa: SLF001 - the start-up alone is what is measured
            times.append(time.perf_counter() - start)
            pool._kill(worker)  # noqa: SLF001
    finally:
        pool.close()
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("llmrl.reward").setLevel(logging.ERROR)  # the report is printed below instead
    print(f"{'per call (us)':<18}{'in-process':>12}{'sandbox off':>14}{'sandbox on':>13}{'overhead':>11}")
    guarantees: dict[str, str] = {}
    for grader in GRADERS:
        us, guarantees = per_call_us(grader, args.calls, args.repeats)
        print(f"{grader:<18}{us['in-process']:>12.1f}{us['off']:>14.1f}{us['on']:>13.1f}{us['on'] - us['off']:>+11.1f}")
    off, on = start_ms(args.starts, False), start_ms(args.starts, True)
    print(f"{'worker start (ms)':<18}{'':>12}{off:>14.1f}{on:>13.1f}{on - off:>+11.1f}")
    print("sandbox guarantees here:")
    for name, state in guarantees.items():
        print(f"  {name}: {state}")

if __name__ == "__main__":
    main()
