"""Live A/B split: sticky per user, share respected, monotone in the share."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from persona_router.adapters.residency import Lease
from persona_router.core.errors import AdapterError, ConfigError
from persona_router.service.ab_serving import LiveSplits
from persona_router.service.ab_split import (
    CANDIDATE,
    CONTROL,
    UNASSIGNED,
    Assignment,
    SplitConfig,
    arm_version,
    assign,
    bucket,
    check_versions,
)
from persona_router.service.metrics import ServiceMetrics


def test_same_user_always_gets_the_same_arm() -> None:
    config = SplitConfig(persona="clinician", control="3", candidate="4", share=0.3)
    for user in ("alice", "bob", "user-17"):
        arms = {assign(config, user).arm for _ in range(20)}
        assert len(arms) == 1
    # Equal configs built separately agree (nothing depends on process state).
    again = SplitConfig(persona="clinician", control="3", candidate="4", share=0.3)
    assert [assign(config, f"u{i}") for i in range(50)] == [assign(again, f"u{i}") for i in range(50)]


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_share_is_respected_over_many_users(share: float) -> None:
    config = SplitConfig(persona="student", control="1", candidate="2", share=share)
    n = 20000
    candidates = sum(assign(config, f"user-{i}").arm == CANDIDATE for i in range(n))
    # Binomial sd at n=20000 is at most 0.0036; 0.015 is > 4 sd.
    assert abs(candidates / n - share) < 0.015


def test_raising_the_share_only_moves_users_to_the_candidate() -> None:
    low = SplitConfig(persona="student", control="1", candidate="2", share=0.2)
    high = SplitConfig(persona="student", control="1", candidate="2", share=0.5)
    for i in range(2000):
        if assign(low, f"u{i}").arm == CANDIDATE:
            assert assign(high, f"u{i}").arm == CANDIDATE


def test_salt_and_persona_reshuffle() -> None:
    a = [bucket("exp-1", "student", f"u{i}") for i in range(200)]
    b = [bucket("exp-2", "student", f"u{i}") for i in range(200)]
    c = [bucket("exp-1", "clinician", f"u{i}") for i in range(200)]
    assert a != b and a != c
    assert all(0.0 <= x < 1.0 for x in a)


def test_no_user_gets_the_control_version_outside_the_experiment() -> None:
    config = SplitConfig(persona="student", control="1", candidate="2", share=1.0)
    got = assign(config, None)
    assert got.arm == UNASSIGNED and got.version == "1" and got.bucket is None and "no user" in got.reason
    assert assign(config, "someone").version == "2"


def test_start_up_checks_the_versions_against_the_registry(caplog: pytest.LogCaptureFixture) -> None:
    split = SplitConfig(persona="student", control="latest", candidate="2", share=0.5)
    check_versions(split, [1, 2, 3], 3)
    with pytest.raises(ConfigError, match=r"no published version 2 \(versions: 1, 3\)") as missing:
        check_versions(split, [1, 3], 3)
    assert missing.value.field == "candidate"
    with pytest.raises(ConfigError, match="no published version 4"):
        check_versions(SplitConfig(persona="student", control="4", candidate="2", share=0.5), [1, 2], 2)
    # 'latest' already equal to the other arm (the candidate was promoted): a warning, not a failed start-up;
    # the service keeps such requests outside the experiment.
    assert not caplog.records
    check_versions(split, [1, 2], 2)
    check_versions(SplitConfig(persona="student", control="3", candidate="latest", share=0.5), [1, 2, 3], 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "the candidate itself" in warnings[0] and "the control itself" in warnings[1]


class FakeResidency:
    """The two calls LiveSplits makes: a live version per persona, and leases that fail for broken versions."""

    def __init__(self, live: int, broken: tuple[int, ...] = ()) -> None:
        self.live_version = live
        self.broken = broken

    def live(self, persona: str) -> int | None:
        return self.live_version

    async def acquire(self, persona: str, version: int | None = None) -> Lease:
        wanted = self.live_version if version is None else version
        if wanted in self.broken:
            raise AdapterError(f"{persona} version {wanted} is corrupt", path=f"/srv/adapters/{persona}/{wanted}")
        return Lease(persona, wanted, f"{persona}@{wanted}")


def _user_in(arm: str, config: SplitConfig) -> str:
    return next(f"u{i}" for i in range(1000) if assign(config, f"u{i}").arm == arm)


def _lease(splits: LiveSplits, config: SplitConfig, user: str | None) -> tuple[Assignment, Lease | None]:
    return asyncio.run(splits.lease(config, user))


def test_an_unusable_arm_keeps_its_users_in_that_arm() -> None:
    config = SplitConfig(persona="student", control="latest", candidate="1", share=0.5, salt="t")
    metrics = ServiceMetrics()
    splits = LiveSplits([config], FakeResidency(live=2, broken=(1,)), metrics)  # type: ignore[arg-type]
    assignment, lease = _lease(splits, config, _user_in(CANDIDATE, config))
    # Intention to treat: the candidate's failure stays in the candidate's count, served by the live version.
    assert assignment.arm == CANDIDATE and assignment.version == "1"
    assert lease is not None and lease.version == 2 and assignment.served == "2"
    assert "unusable" in assignment.reason and "/srv/adapters" not in assignment.reason  # the client sees it
    assert metrics.ab.get(persona="student", arm=CANDIDATE, adapter_version="2") == 1
    assert metrics.ab.get(persona="student", arm=CONTROL, adapter_version="2") == 0
    served = _lease(splits, config, _user_in(CONTROL, config))[0]
    assert served.arm == CONTROL and served.served == "2" and served.to_json()["served"] == "2"


def test_requests_leave_the_experiment_while_latest_is_the_other_arm() -> None:
    config = SplitConfig(persona="student", control="latest", candidate="3", share=0.5, salt="t")
    residency = FakeResidency(live=2)
    splits = LiveSplits([config], residency, ServiceMetrics())  # type: ignore[arg-type]
    control_user, candidate_user = _user_in(CONTROL, config), _user_in(CANDIDATE, config)
    assert _lease(splits, config, control_user)[0].arm == CONTROL
    residency.live_version = 3  # the candidate was published as the live version after start-up
    for user in (control_user, candidate_user):
        assignment, lease = _lease(splits, config, user)
        assert assignment.arm == UNASSIGNED and "both arms are version 3" in assignment.reason
        assert lease is not None and lease.version == 3
    residency.live_version = 2  # rolled back: the experiment resumes with the same users in the same arms
    assert _lease(splits, config, control_user)[0].arm == CONTROL
    assert _lease(splits, config, candidate_user)[0].served == "3"


def test_config_validation_and_json_round_trip() -> None:
    config = SplitConfig(persona="student", control="1", candidate="2", share=0.25, salt="spring")
    assert SplitConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="share"):
        SplitConfig(persona="student", control="1", candidate="2", share=1.5)
    with pytest.raises(ConfigError, match="candidate"):
        SplitConfig(persona="student", control="1", candidate="1", share=0.5)
    with pytest.raises(ConfigError, match="salt"):
        SplitConfig(persona="student", control="1", candidate="2", share=0.5, salt="has space")
    with pytest.raises(ConfigError, match="unknown keys"):
        SplitConfig.from_json({"persona": "student", "control": "1", "candidate": "2", "share": 0.5, "x": 1})
    with pytest.raises(ConfigError, match="control"):
        SplitConfig.from_json({"persona": "student", "candidate": "2", "share": 0.5})


@pytest.mark.parametrize(("control", "candidate", "field"), [
    ("1", "v2", "candidate"), ("v1", "2", "control"), ("1", "0", "candidate"), ("1", "2.0", "candidate"),
    ("1", "", "candidate"), ("01", "2", "control"), ("latest", "next", "candidate"),
])
def test_arms_must_name_versions(control: str, candidate: str, field: str) -> None:
    with pytest.raises(ConfigError, match="is not an adapter version") as info:
        SplitConfig(persona="student", control=control, candidate=candidate, share=0.5)
    assert info.value.field == field
    assert SplitConfig(persona="student", control="latest", candidate="7", share=0.5).candidate == "7"
    assert (arm_version("latest"), arm_version("7")) == (None, 7)


def test_the_persona_must_be_a_persona_name() -> None:
    with pytest.raises(ConfigError) as info:
        SplitConfig(persona="../student", control="1", candidate="2", share=0.5)
    assert info.value.field == "persona"


def test_serve_refuses_a_split_whose_candidate_is_not_a_version_at_start_up(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real start-up path (``persona-router serve --ab FILE``) stops before loading any model."""
    from persona_router.cli.main import main

    split = tmp_path / "ab.json"
    split.write_text(json.dumps({"persona": "student", "control": "1", "candidate": "v2", "share": 0.5}))
    code = main(["serve", "--ab", str(split), "--router", "fallback", "--no-warmup", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"persona-router serve: error: {split}: field 'candidate'" in err
    assert "field 'candidate'" in err and "'v2' is not an adapter version of persona 'student'" in err


def test_serve_refuses_a_split_of_a_persona_the_pack_does_not_define(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main

    split = tmp_path / "ab.json"
    split.write_text(json.dumps({"persona": "pilot", "control": "1", "candidate": "2", "share": 0.5}))
    assert main(["serve", "--ab", str(split), "--router", "fallback", "--no-warmup", "--port", "0"]) == 2
    assert "unknown persona 'pilot'; valid personas: clinician, educator" in capsys.readouterr().err


def test_serve_refuses_a_split_whose_version_was_never_published(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main

    split = tmp_path / "ab.json"
    split.write_text(json.dumps({"persona": "student", "control": "latest", "candidate": "7", "share": 0.5}))
    code = main(["serve", "--ab", str(split), "--adapters", str(tmp_path / "adapters"), "--router", "fallback",
                 "--no-warmup", "--port", "0"])
    assert code == 2
    assert "persona 'student' has no published version 7 (versions: none)" in capsys.readouterr().err
