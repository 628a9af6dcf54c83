"""Public calls that chain pipelines and publishing (the entry layer): the CLI and notebooks call these.

`train` runs the uptraining loop and then, when the recipe names `push_to_hub`, publishes the finished
model: the loop itself knows nothing about the Hub.
"""
from __future__ import annotations


def train(recipe, overrides: list[str] | None = None, **kwargs):
    """uptrain.training.train (same arguments, same TrainResult), then `uptrain.push` of the result on the
    main process when the run finished and the recipe sets push_to_hub."""
    from uptrain.training import train as run

    result = run(recipe, overrides, **kwargs)
    if result.finished and result.push_to_hub and result.process_index == 0:
        from uptrain.publishing import push

        print(push(result.out, repo_id=result.push_to_hub).summary(), flush=True)
    return result
