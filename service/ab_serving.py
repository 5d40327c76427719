"""The live A/B split at serving time: which adapter version answers one request of a persona under a split.

``ab_split`` decides the arm from the user alone; this module turns the arm into a lease, keeps the arm when
another version has to answer (intention to treat) and takes requests out of the experiment while both arms
name the same version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from persona_router.adapters.residency import AdapterResidency, Lease
from persona_router.core.errors import AdapterError, public_message
from persona_router.service.ab_split import UNASSIGNED, Assignment, SplitConfig, arm_version, assign, other_arm
from persona_router.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def served(lease: Lease | None) -> str:
    return str(lease.version) if lease else "prompt-only"


class LiveSplits:
    """The service's A/B splits, one per persona, served through the adapter residency."""

    def __init__(self, splits: Sequence[SplitConfig], residency: AdapterResidency, metrics: ServiceMetrics) -> None:
        self.by_persona: dict[str, SplitConfig] = {split.persona: split for split in splits}
        self.residency = residency
        self.metrics = metrics
        self._collapsed: set[tuple[str, int]] = set()

    def get(self, persona: str) -> SplitConfig | None:
        return self.by_persona.get(persona)

    async def lease(self, split: SplitConfig, user: str | None) -> tuple[Assignment, Lease | None]:
        persona = split.persona
        assignment = self._same_versions(split, assign(split, user))
        try:
            lease = await self.residency.acquire(persona, arm_version(assignment.version))
        except AdapterError as exc:
            # A broken or missing arm must not fail its users: serve the live version and say so, keeping the
            # arm the user was assigned so that the arm's failures stay in its own count.
            log.warning("A/B arm %s of %s is unusable: %s", assignment.version, persona, exc)
            lease = await self.residency.acquire(persona)
            # The reason goes to the client: the error's message without its file-system location.
            assignment = assignment.serving(served(lease), f"{assignment.arm} version {assignment.version} is "
                                            f"unusable ({public_message(exc)}); served the live version")
        else:
            assignment = assignment.serving(served(lease))
        self.metrics.ab.inc(persona=persona, arm=assignment.arm, adapter_version=served(lease))
        return assignment, lease

    def _same_versions(self, split: SplitConfig, assignment: Assignment) -> Assignment:
        """A 'latest' arm follows the live version, which a publish or a disable can move onto the other arm's
        version: such requests compare nothing, so they leave the experiment (served the control version)."""
        if assignment.arm == UNASSIGNED:
            return assignment
        mine = self._resolve(split.persona, assignment.version)
        if mine is None or mine != self._resolve(split.persona, other_arm(split, assignment.arm)):
            return assignment
        if (split.persona, mine) not in self._collapsed:  # once, not once per request
            self._collapsed.add((split.persona, mine))
            log.warning("A/B of %s: both arms are version %s now; requests leave the experiment until they "
                        "differ", split.persona, mine)
        return Assignment(UNASSIGNED, split.control, assignment.bucket,
                          f"both arms are version {mine} now ('latest' moved): outside the experiment")

    def _resolve(self, persona: str, version: str) -> int | None:
        number = arm_version(version)
        return self.residency.live(persona) if number is None else number
