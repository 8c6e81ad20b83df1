"""`TrainingModel` and `Sampler` whose default backend is the remote server (for `twinkle_client`)."""

from __future__ import annotations

from twinkle.api import objects as _local
from twinkle.client.connect import current_backend


class TrainingModel(_local.TrainingModel):
    __doc__ = _local.TrainingModel.__doc__

    def __init__(self, *args, backend=None, **kwargs) -> None:
        super().__init__(*args, backend=backend or current_backend(), **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, *, backend=None, **kwargs) -> "TrainingModel":
        return super().from_checkpoint(path, backend=backend or current_backend(), **kwargs)


class Sampler(_local.Sampler):
    __doc__ = _local.Sampler.__doc__

    def __init__(self, *args, backend=None, **kwargs) -> None:
        super().__init__(*args, backend=backend or current_backend(), **kwargs)
