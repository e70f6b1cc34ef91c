"""Download a model from the Hugging Face hub into a folder, for nodes that have no network.

    python -m utils.llm.download Qwen/Qwen3-4B --to /shared/models/Qwen3-4B
    python -m utils.llm.download Qwen/Qwen3-4B --to /shared/models/Qwen3-4B --revision COMMIT

Why a folder rather than the hub cache: cluster GPU nodes often cannot reach the hub, and a plain
folder on a shared file system is what every ``--model`` (labelling, the server, PPO-LLM, LLM play)
takes as a local path; its identity is then recorded as a fingerprint of its config and weights
(``utils.llm.model_revision``), whatever the hub's branch has moved to since. ``--revision`` pins a
branch, tag or commit so two sites download the same weights. Re-running resumes and skips files
already complete (``huggingface_hub.snapshot_download`` with ``local_dir``). Gated or private
models need a token: ``hf auth login`` or ``HF_TOKEN``. Every hub or disk problem is one ``error:``
line (``utils.errors``), not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from utils.errors import UserError, exit_on_user_error

_HTTP_LIBRARIES = ("httpx", "httpx2", "requests", "urllib3")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def download(model: str, to: str | os.PathLike, revision: str | None = None) -> str:
    """Download hub model ``model`` (at ``revision``; the default branch when None) into ``to``.

    Returns the folder. Raises ``UserError`` with one line for everything a user can fix: a local
    path given as the model, a target that is a file, an unknown model or revision, a gated model
    without a token, no network (or ``HF_HUB_OFFLINE`` set), a disk that cannot be written."""
    target = Path(to).expanduser()
    if Path(model).expanduser().exists():
        raise UserError(f"{model} is already a local path; give a hub id (owner/name) to download, "
                        "or pass the folder to --model as it is")
    if target.exists() and not target.is_dir():
        raise UserError(f"--to {target} is a file; give a folder (it is created if missing)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise UserError(f"huggingface_hub is not installed ({exc}): pip install -e '.[llm]'") from None
    where = f"{model}" + (f" at revision {revision}" if revision else "")
    try:
        path = snapshot_download(repo_id=model, revision=revision, local_dir=str(target))
    except GatedRepoError as exc:
        raise UserError(f"{model} is gated: accept its terms on https://huggingface.co/{model}, then log in "
                        f"(hf auth login, or set HF_TOKEN) and run this again ({_first_line(exc)})") from None
    except RepositoryNotFoundError as exc:
        raise UserError(f"no model {model!r} on the Hugging Face hub (or it is private: log in with "
                        f"hf auth login or set HF_TOKEN) ({_first_line(exc)})") from None
    except RevisionNotFoundError as exc:
        raise UserError(f"{model} has no revision {revision!r}; give a branch, tag or commit hash that "
                        f"exists ({_first_line(exc)})") from None
    except HFValidationError as exc:
        raise UserError(f"{model!r} is not a hub model id (owner/name): {_first_line(exc)}") from None
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        offline_set = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        offline = " (HF_HUB_OFFLINE is set: unset it)" if offline_set else ""
        raise UserError(f"cannot reach the Hugging Face hub to download {where}{offline}: {_first_line(exc)}; "
                        f"run this on a machine with network, then copy {target} to the offline node") from None
    except HfHubHTTPError as exc:
        raise UserError(f"the Hugging Face hub refused the download of {where}: {_first_line(exc)}") from None
    except OSError as exc:
        raise UserError(f"could not write {where} into {target}: {_first_line(exc)}") from None
    except Exception as exc:
        # The hub client's HTTP library (httpx, or requests in older releases) raises its own transport
        # errors mid-download (connection reset, proxy, timeout); they are the network's fault, not a bug.
        if type(exc).__module__.split(".")[0] not in _HTTP_LIBRARIES:
            raise
        raise UserError(f"the network failed while downloading {where}: {type(exc).__name__}: "
                        f"{_first_line(exc)}; run this again to resume") from None
    return str(path)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.llm.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="hub model id, e.g. Qwen/Qwen3-4B")
    parser.add_argument("--to", required=True, metavar="DIR",
                        help="folder to download into (created if missing); then pass it to --model")
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit hash to download (default: the hub's default branch)")
    args = parser.parse_args(argv)
    path = download(args.model, args.to, args.revision)
    print(f"downloaded {args.model}{f' at revision {args.revision}' if args.revision else ''} to {path}; "
          f"use --model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
