"""The authors' released DDP models: recognise, convert and load official mmseg checkpoints.

``densediff convert SRC OUT`` / :func:`convert` writes a densediff run folder;
``densediff.load(SRC)`` (and every CLI command that takes a checkpoint) accepts an official
``.pth`` or ``hf://<repo>/<file>`` directly (:func:`load_official`). :data:`RELEASED` lists the
released models (``densediff models``). Nothing here needs mmcv or the official code.
"""

from densediff.official.catalog import HUB_REPO, RELEASED, ReleasedModel, find_released
from densediff.official.convert import (
    convert,
    describe,
    is_official_source,
    load_official,
    read_official,
    resolve_source,
)
from densediff.official.hub import hub_download, is_hub_uri, parse_hub_uri
from densediff.official.mapping import convert_state, unfold_to_concat

__all__ = ["HUB_REPO", "RELEASED", "ReleasedModel", "convert", "convert_state", "describe",
           "find_released", "hub_download", "is_hub_uri", "is_official_source", "load_official",
           "parse_hub_uri", "read_official", "resolve_source", "unfold_to_concat"]
