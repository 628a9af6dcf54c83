"""Publishing: `push` a checkpoint folder to the Hugging Face Hub with a generated model card.

    card_facts.py   what the card says, as plain data (uptrain.json, config, eval rows, licence)
    model_card.py   the card itself: ModelCardData front matter + sections, rendered from the facts
    validation.py   what is checked before anything leaves the machine: weights, config.json, KV heads, JSON
    allow_list.py   which files are uploaded, and the plan of an upload (files, card)
    retries.py      transient Hub failures tried again, with backoff
    failures.py     Hub errors as one message each
    hub.py          push: the token, the staged folder, one commit (weights first for a large folder)
    options.py      PushOptions: the flags of `uptrain push` = the arguments of `uptrain.push(...)`

Only the entry layer (uptrain/api.py, uptrain/cli.py, uptrain/__init__.py) imports this package.
Importing it stays cheap: torch and transformers load when a push runs, not before.
"""
from uptrain.publishing.hub import PushResult, push
from uptrain.publishing.options import PushOptions

__all__ = ["PushOptions", "PushResult", "push"]
