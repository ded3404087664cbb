"""The error every reader raises for an unusable file: it names the file and the reason."""

from __future__ import annotations

import os

__all__ = ["VolumeError"]


class VolumeError(ValueError):
    """A volume that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
