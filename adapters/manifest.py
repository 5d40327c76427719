"""``manifest.json``: what one trained adapter is, how it was made and how well it trained.

The manifest sits beside ``adapter_config.json`` and ``adapter_model.safetensors`` in every registry version
folder. The service reads ``base_fingerprint`` to refuse an adapter trained on another base; people read the
rest to reproduce or compare runs. JSON only (no pickle), and unknown keys from a newer writer are kept in
``extra`` rather than dropped, so reading and re-writing a manifest never loses information.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persona_router.core.atomic import atomic_write_json
from persona_router.core.errors import AdapterError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class DatasetInfo:
    """Where the training rows came from and how many were used."""

    source: str  # a file path, a hub id, or "demo"
    sha256: str  # over the persona's training records as canonical JSON lines (see training/formatting.py)
    rows_train: int
    rows_eval: int
    eval_source: str  # e.g. "demo test split" or "held-out 10% of <file>"
    rows_skipped: int = 0  # question + answer alone longer than max_length
    contexts_truncated: int = 0

    def __post_init__(self) -> None:
        for name in ("rows_train", "rows_eval", "rows_skipped", "contexts_truncated"):
            if getattr(self, name) < 0:
                raise AdapterError(f"must be >= 0, got {getattr(self, name)}", field=f"dataset.{name}")


@dataclass(frozen=True)
class TrainMetrics:
    """Measured outcomes of one training run; losses are mean token cross-entropy on answer tokens only."""

    train_loss: float | None
    eval_loss: float | None
    eval_loss_before: float | None  # the base model (adapter disabled) on the same eval rows
    steps: int
    epochs: float
    tokens_seen: int  # non-padding tokens fed to the model by this process (after a resume: since the resume)
    wall_time_s: float  # load + format + evaluate + train + save
    tokens_per_s: float  # tokens_seen / train_time_s
    peak_memory_mb: float
    peak_memory_kind: str  # "cuda_max_allocated" or "process_max_rss"
    train_time_s: float = 0.0  # the optimisation loop alone
    resumed_from_step: int = 0


@dataclass(frozen=True)
class AdapterManifest:
    persona: str
    version: int
    base_model: str  # what the user passed as --base (alias, folder or hub id)
    base_fingerprint: str  # core/fingerprint.py over the base folder
    dataset: DatasetInfo
    hyperparameters: dict[str, Any]
    metrics: TrainMetrics
    device: str
    precision: str
    library_versions: dict[str, str]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.persona:
            raise AdapterError("must be a non-empty string", field="persona")
        if not isinstance(self.version, int) or self.version < 1:
            raise AdapterError(f"must be an integer >= 1, got {self.version!r}", field="version")
        if not self.base_fingerprint.startswith("sha256:"):
            raise AdapterError(f"must look like 'sha256:<hex>', got {self.base_fingerprint!r}",
                               field="base_fingerprint")

    def with_version(self, version: int) -> AdapterManifest:
        """A copy naming another version (the registry assigns the number at publish time)."""
        data = self.to_json()
        data["version"] = version
        return AdapterManifest.from_json(data)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "manifest") -> AdapterManifest:
        if not isinstance(data, dict):
            raise AdapterError("must be a JSON object", path=where)
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = sorted(k for k in known if k not in data and k not in ("created_at", "format"))
        if missing:
            raise AdapterError(f"missing keys {missing}", path=where)
        try:
            dataset = DatasetInfo(**data["dataset"])
            metrics = TrainMetrics(**data["metrics"])
        except TypeError as exc:
            raise AdapterError(f"malformed dataset or metrics block ({exc})", path=where) from exc
        values = {k: data[k] for k in known if k in data and k not in ("dataset", "metrics")}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(dataset=dataset, metrics=metrics, extra=extra, **values)


def write_manifest(folder: Path, manifest: AdapterManifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    atomic_write_json(path, manifest.to_json())
    return path


def read_manifest_file(folder: Path) -> AdapterManifest:
    path = Path(folder) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AdapterError("no manifest.json: not a trained adapter folder", path=folder) from exc
    except (OSError, ValueError) as exc:
        raise AdapterError(f"unreadable manifest ({exc})", path=path) from exc
    return AdapterManifest.from_json(data, where=str(path))
