"""``hf://<owner>/<repo>/<path/in/repo>`` sources, fetched with ``huggingface_hub``.

Downloads go through the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), so a file is
fetched once; with ``HF_HUB_OFFLINE=1`` only the cache is read. Any failure is one
:class:`~densediff.errors.CheckpointError` line naming the repository and the file.
"""

from __future__ import annotations

from pathlib import Path

from densediff.errors import CheckpointError, one_line, terminal_line

SCHEME = "hf://"


def is_hub_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith(SCHEME)


def parse_hub_uri(uri: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo/path/file.pth[@revision]`` -> ``(repo_id, filename, revision)``."""
    shown = terminal_line(uri)  # the URI as one printable line, for messages
    rest = uri[len(SCHEME):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise CheckpointError(f"{shown}: empty revision after '@'")
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"{shown}: expected hf://<owner>/<repo>/<file> "
                              f"(e.g. hf://yfji/DDP-Weight/ddp_swin_t_2x8_512x512_160k_ade20k.pth)")
    if any(p in (".", "..") for p in parts):
        raise CheckpointError(f"{shown}: '.' and '..' are not allowed in a Hub path")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def hub_download(uri: str) -> Path:
    """The local path of a Hub file (downloaded into the Hugging Face cache if needed)."""
    repo_id, filename, revision = parse_hub_uri(uri)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{terminal_line(uri)}: hf:// sources need the huggingface_hub package "
                              "(pip install 'densediff[hf]')") from None
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings: the one line below says it all
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except Exception as e:  # noqa: BLE001 -- network, cache, auth, missing file: one line each
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            from huggingface_hub import constants

            why = ("not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
                   if constants.HF_HUB_OFFLINE else
                   "not in the local Hugging Face cache, and the Hub cannot be reached")
        elif kind == "EntryNotFoundError" or kind == "RemoteEntryNotFoundError":
            why = "no such file in the repository"
        elif kind == "RepositoryNotFoundError":
            why = "no such repository (or it is private)"
        elif kind == "RevisionNotFoundError":
            why = f"no revision {revision!r}"
        else:
            why = one_line(e)
        raise CheckpointError(f"{terminal_line(uri)}: cannot get {terminal_line(filename)} from "
                              f"the Hub repository {terminal_line(repo_id)}: {why}") from None
    finally:
        hub_logging.set_verbosity(verbosity)
