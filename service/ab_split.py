"""Live A/B assignment for the service: a share of a persona's traffic goes to a candidate adapter version.

The arm is a pure function of ``(experiment salt, persona, user)``: a SHA-256 hash maps each user to a
bucket in [0, 1) and buckets below ``share`` get the candidate. The same user therefore always gets the
same arm, raising the share only moves users from control to candidate (never back), and a new salt
reshuffles everyone for a fresh experiment. Requests without a ``user`` cannot be kept sticky: they are served
the control version but stay outside the experiment (arm ``unassigned``), so that the control arm's metrics
hold the same kind of traffic as the candidate's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from persona_router.core.errors import ConfigError
from persona_router.core.names import check_persona_name

if TYPE_CHECKING:
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import PersonaPack

log = logging.getLogger(__name__)

CONTROL, CANDIDATE, UNASSIGNED = "control", "candidate", "unassigned"
LATEST = "latest"
_SALT = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_VERSION = re.compile(r"^[1-9][0-9]*$")


@dataclass(frozen=True)
class SplitConfig:
    """One persona's experiment: ``share`` of users go to ``candidate``, the rest stay on ``control``."""

    persona: str
    control: str  # a published adapter version, e.g. "3", or "latest"
    candidate: str
    share: float
    salt: str = "exp-1"

    def __post_init__(self) -> None:
        check_persona_name(self.persona)
        for name in (CONTROL, CANDIDATE):
            value = getattr(self, name)
            if value != LATEST and not (isinstance(value, str) and _VERSION.match(value)):
                raise ConfigError(f"{value!r} is not an adapter version of persona {self.persona!r}: use a "
                                  f"published version number such as '3', or {LATEST!r}", field=name)
        if self.control == self.candidate:
            raise ConfigError(f"candidate {self.candidate!r} equals control; an A/B needs two versions",
                              field="candidate")
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"{self.share} must be between 0 and 1 (fraction of users sent to the candidate)",
                              field="share")
        if not _SALT.match(self.salt):
            raise ConfigError(f"{self.salt!r} must be 1-64 letters, digits or . _ : -", field="salt")

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SplitConfig:
        known = {"persona", "control", "candidate", "share", "salt"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown keys {sorted(unknown)}; valid keys: {sorted(known)}", field="ab_split")
        try:
            return cls(persona=str(raw["persona"]), control=str(raw["control"]), candidate=str(raw["candidate"]),
                       share=float(raw["share"]), salt=str(raw.get("salt", "exp-1")))
        except KeyError as exc:
            raise ConfigError("is missing", field=str(exc.args[0])) from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"must be a number ({exc})", field="share") from exc

    def to_json(self) -> dict[str, Any]:
        return {"persona": self.persona, "control": self.control, "candidate": self.candidate,
                "share": self.share, "salt": self.salt}


@dataclass(frozen=True)
class Assignment:
    """One request's place in the experiment. ``arm`` stays the arm the user was assigned even where another
    version answered (intention to treat: an arm that fails must not hand its failures to the other arm);
    ``served`` says which version did answer, once the lease is taken."""

    arm: str  # "control", "candidate" or "unassigned" (outside the experiment)
    version: str  # the arm's version as configured: a number or "latest"
    bucket: float | None  # the user's position in [0, 1); None without a user
    reason: str
    served: str | None = None  # the version that answered ("prompt-only" without an adapter)

    def to_json(self) -> dict[str, Any]:
        return {"arm": self.arm, "version": self.version, "served": self.served, "bucket": self.bucket,
                "reason": self.reason}

    def serving(self, served: str, reason: str | None = None) -> Assignment:
        return replace(self, served=served, reason=reason or self.reason)


def arm_version(version: str) -> int | None:
    """The registry version an arm names: ``None`` for ``latest`` (the live version), else the number."""
    return None if version == LATEST else int(version)


def bucket(salt: str, persona: str, user: str) -> float:
    """A uniform position in [0, 1) from the first 8 bytes of SHA-256 over the NUL-joined fields."""
    digest = hashlib.sha256("\x00".join((salt, persona, user)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(config: SplitConfig, user: str | None) -> Assignment:
    """The arm for one request; deterministic in (salt, persona, user)."""
    if not user:
        return Assignment(UNASSIGNED, config.control, None, "no user given: served the control version, outside "
                          "the experiment (assignment needs a user)")
    position = bucket(config.salt, config.persona, user)
    if position < config.share:
        return Assignment(CANDIDATE, config.candidate, position, f"bucket {position:.4f} < share {config.share}")
    return Assignment(CONTROL, config.control, position, f"bucket {position:.4f} >= share {config.share}")


def check_versions(config: SplitConfig, versions: Sequence[int], latest: int | None) -> None:
    """At start-up: each numbered arm must be a published version of the persona. An arm that is ``latest``
    and already the other arm's version compares nothing, but is only warned about: it is what promoting the
    candidate (publishing it as the live version) leaves, a restart then must not fail, and the service takes
    such requests out of the experiment (``ab_serving``) until the arms differ again."""
    have = ", ".join(map(str, versions)) or "none"
    for name in (CONTROL, CANDIDATE):
        value = getattr(config, name)
        if value != LATEST and int(value) not in versions:
            raise ConfigError(f"persona {config.persona!r} has no published version {value} (versions: {have})",
                              field=name)
    for name, other in ((CONTROL, CANDIDATE), (CANDIDATE, CONTROL)):
        if getattr(config, name) == LATEST and latest is not None and str(latest) == getattr(config, other):
            log.warning("A/B of %s: 'latest' (the %s) is version %d, the %s itself; its requests stay outside the "
                        "experiment until the arms differ (name the %s by number, or end the experiment)",
                        config.persona, name, latest, other, name)


def other_arm(config: SplitConfig, arm: str) -> str:
    """The version the other arm names: what ``arm`` is compared against."""
    return config.candidate if arm == CONTROL else config.control


def check_splits(splits: Sequence[SplitConfig], pack: PersonaPack, registry: AdapterRegistry) -> None:
    """Start-up, before any model loads: each split names a persona of the pack (``UnknownPersonaError`` lists
    the valid ones) and versions its adapters folder holds (``check_versions``)."""
    for split in splits:
        pack.get(split.persona)
        check_versions(split, registry.versions(split.persona), registry.latest(split.persona))
