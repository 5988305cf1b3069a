"""A reward for the dynamic-sampling tests, referenced by path as `tests/half_constant_reward.py:half_constant`."""


def half_constant(completion: str, task) -> float:
    """Tasks with an even index score 0.5 whatever was written, so their groups carry no signal;
    the others score the completion's length in characters, which varies between samples."""
    index = int(task.task_id.rsplit("-", 1)[-1])
    return 0.5 if index % 2 == 0 else float(len(completion))
