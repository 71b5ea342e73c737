"""Push an adapter or a merged model folder to the Hugging Face Hub with huggingface_hub.

The token comes from `HF_TOKEN` only (the variable huggingface_hub itself reads); it is passed to
HfApi, never printed, and scrubbed from any error text. `HF_ENDPOINT` points the client elsewhere
(a private Hub, or the test suite's fake). Upload = `create_repo(exist_ok=True)` + `upload_folder`,
i.e. preupload -> LFS/Xet uploads of the weights -> one commit; a failed commit leaves the repo's
previous revision as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cloudtune.errors import UserError

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
SKIP = ["cloudtune_merge.json", "merged/**", "*.log"]


def check_repo(repo: str) -> str:
    if not REPO_RE.fullmatch(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise UserError(f"--repo {repo!r} is not a Hub repo id; use user/name (letters, digits, - _ .)")
    return repo


def token_from_env() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("HF_TOKEN is not set; create a write token at https://huggingface.co/settings/tokens and "
                        "export HF_TOKEN=... (it is read from the environment only, never from flags)")
    return token


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_folder(folder: Path, repo: str, token: str, private: bool = False, message: str | None = None) -> str:
    """Create the repo if needed and commit the folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message=message or f"cloudtune: upload {folder.name}",
                                 ignore_patterns=SKIP)
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub will not reach the "
                        "Hub; unset it for the push") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        first = _scrub(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, token)
        if status in (401, 403):
            raise UserError(f"the Hub refused HF_TOKEN for {repo} ({status}): {first}; use a token with write "
                            "access to that namespace", exit_code=3) from None
        raise UserError(f"push to {repo} failed ({status}): {first}", exit_code=3) from None
    return str(getattr(info, "commit_url", info))
