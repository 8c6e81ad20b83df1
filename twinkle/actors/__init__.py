"""The actor layer: engines in Ray actors, placed with placement groups, called as groups."""

from twinkle.actors.group import ActorGroup
from twinkle.actors.runtime import init_ray

__all__ = ["ActorGroup", "init_ray"]
