"""Publishing a QPA adapter to the Hugging Face Hub with its QPA model card."""

from __future__ import annotations

import tempfile
from typing import Optional

from huggingface_hub import HfApi


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload QPA adapter",
    create_pr: bool = False,
) -> str:
    """Upload ``peft_model.save_pretrained(...)`` output, model card included, to ``repo_id``.

    ``peft_model.push_to_hub`` (transformers' mixin) also uploads the adapter, but replaces README.md with
    the repository's existing card or a generic transformers card (``library_name: transformers``); this
    function uploads the card that ``save_pretrained`` wrote (``library_name: peft``, QPA tags and facts).
    Returns the commit URL.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        peft_model.save_pretrained(tmp_dir)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=tmp_dir, token=token, revision=revision,
            commit_message=commit_message, create_pr=create_pr,
        )
    return str(commit)
