"""huggingface_hub's exceptions as one clear message each, naming the remedy in the caller's words, with the token
scrubbed out."""
from __future__ import annotations

from contextlib import contextmanager

from uptrain.errors import UptrainError
from uptrain.publishing.options import PushOptions
from uptrain.publishing.retries import tries_text


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str, token: str | None,
               said: PushOptions | None = None):
    """Turn huggingface_hub's exceptions into one clear message each (with the token scrubbed out); said: the
    caller's options, for the words of a remedy."""
    said = said or PushOptions()
    from huggingface_hub import errors

    def fail(msg, e):
        raise UptrainError(msg.replace(token, "***") if token else msg) from e

    owner = repo_id.split("/")[0] if "/" in repo_id else "your account"
    try:
        yield
    except errors.OfflineModeIsEnabled as e:
        fail(f"HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it (or use {said.said('dry_run', True)})", e)
    except errors.RevisionNotFoundError as e:
        fail(f"branch {revision!r} does not exist in {repo_id} and could not be created: {e.server_message or e}", e)
    except errors.RepositoryNotFoundError as e:
        fail(f"{repo_id} was not found on {endpoint} (or this token cannot see it)", e)
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        server = f" (the Hub says: {e.server_message})" if e.server_message else ""
        if status == 401:
            fail(f"the Hub rejected the token (401 Unauthorized): it is invalid or expired. Create a write token "
                 f"at {endpoint}/settings/tokens and pass it with {said.key('token')} or HF_TOKEN{server}", e)
        if status == 403:
            fail(f"no write access to {repo_id} (403 Forbidden): the repo or the namespace {owner!r} belongs to "
                 f"someone else, or the token is read-only. Use a repo id under your own name or an organisation "
                 f"you can write to, with a write token{server}", e)
        if status is not None and (status >= 500 or status in (408, 429)):
            fail(f"the Hub had a server error ({status}){tries_text(e)} — try again later: a rerun resumes the "
                 f"upload{server}", e)
        if revision and status in (400, 409, 422):
            fail(f"the Hub refused branch {revision!r} of {repo_id} ({status}){server}", e)
        fail(f"the Hub refused the upload to {repo_id} ({status}){server}", e)
    except (getattr(errors, "HTTPError", OSError), ConnectionError, TimeoutError) as e:
        fail(f"cannot reach {endpoint} ({type(e).__name__}){tries_text(e)}: is the network up? HF_ENDPOINT selects "
             f"another Hub", e)
    except ValueError as e:  # e.g. the Hub's check of the card's YAML metadata
        fail(f"the upload to {repo_id} was refused: {e}", e)
