"""How a checkpoint is pushed, as one dataclass: the flags of `uptrain push` and the keyword arguments of
`uptrain.push(...)` are these fields, and a mistake is reported in the caller's words (`--base-model` on the
command line, `base_model` in Python; uptrain/options.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from uptrain.options import SpokenOptions, option


@dataclass
class PushOptions(SpokenOptions):
    """Every option of a push; the defaults are `uptrain push`'s."""

    KIND = "push option"

    repo_id: Optional[str] = option("Hub repo, e.g. me/llama-gqa8 (created if needed)", required=True, metavar="NAME")
    private: bool = option("create the repo private", False)
    revision: Optional[str] = option("push to this branch (created if needed)", metavar="BRANCH")
    commit_message: Optional[str] = option("the commit's message (default: what was done, from uptrain.json)")
    token: Optional[str] = option("Hub token with write access (default: HF_TOKEN or the saved login)")
    dry_run: bool = option("print the files and the model card; upload nothing", False)
    overwrite_card: bool = option("replace a README.md you wrote with a generated card", False)
    eval_json: Optional[str] = option("results of `uptrain eval … --json` for the card", metavar="FILE")
    base_model: Optional[str] = option("Hub id of the model this one derives from, for the card's base_model (e.g. "
                                       "meta-llama/Llama-2-7b-hf when the source was a local copy); wins over "
                                       "uptrain.json", metavar="ID")

    def check(self) -> PushOptions:
        """Value checks that need neither the folder nor the network: repo ids, the eval results file."""
        from uptrain.errors import UptrainError
        from uptrain.hf import check_hub_id
        from uptrain.publishing.card_facts import read_eval_json

        if not self.repo_id:
            raise UptrainError(f"{self.key('repo_id')} is required: the Hub repo to push to, e.g. me/llama-gqa8")
        check_hub_id(self.repo_id, self.key("repo_id"))
        if self.base_model is not None:
            check_hub_id(self.base_model, self.key("base_model"))
        if self.eval_json is not None:
            read_eval_json(self.eval_json, self.key("eval_json"))
        return self
