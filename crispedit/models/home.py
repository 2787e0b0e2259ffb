"""Where crispedit keeps its own files (converted models, locks) when the user gives no folder."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

HOME_ENV = "CRISPEDIT_HOME"


def crispedit_home() -> Path:
    """The crispedit home folder: `$CRISPEDIT_HOME` if set, else the user's cache folder for crispedit.

    Read on every call (not at import) so tests and users can redirect it per process. The folder is
    not created here; writers create what they need.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("crispedit"))
