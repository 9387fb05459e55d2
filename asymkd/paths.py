"""Where asymkd keeps what it builds once and reuses: converted teacher folders, tokenized packs, corpora.

cache_dir()      # $ASYMKD_CACHE, default ~/.cache/asymkd
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ASYMKD_CACHE", Path.home() / ".cache" / "asymkd"))
