"""How well a router routes a labelled set: metrics of its final decisions (after abstention) and of the bare
argmax, as JSON, markdown and a confusion-matrix PNG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.records import RoutingRecord
from persona_router.router.persona_router import PersonaRouter


@dataclass(frozen=True)
class RoutingReport:
    """Metrics of final decisions (after abstention) and of the bare argmax, over one labelled set."""

    title: str
    labels: tuple[str, ...]
    n: int
    accuracy: float
    macro_f1: float
    coverage: float
    inferred_precision: float | None
    argmax_accuracy: float
    argmax_macro_f1: float
    per_persona: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"labels": list(self.labels)}

    def to_markdown(self) -> str:
        head = (f"**{self.title}** ({self.n} questions): accuracy {self.accuracy:.3f}, macro-F1 "
                f"{self.macro_f1:.3f}, coverage {self.coverage:.3f} (inferred, not fallen back), precision of "
                f"inferred decisions {fmt_optional(self.inferred_precision)}; without abstention: accuracy "
                f"{self.argmax_accuracy:.3f}, macro-F1 {self.argmax_macro_f1:.3f}.\n\n")
        rows = ["| persona | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        rows += [f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |"
                 for name, m in self.per_persona.items()]
        matrix = ["| true \\ decided | " + " | ".join(self.labels) + " |", "|---" * (len(self.labels) + 1) + "|"]
        matrix += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
                   for name, row in zip(self.labels, self.confusion, strict=True)]
        return head + "\n".join(rows) + "\n\nConfusion matrix (rows: true persona, columns: decision):\n\n" + \
            "\n".join(matrix) + "\n"

    def save_confusion_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matrix = np.array(self.confusion)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(self.labels)), self.labels, rotation=45, ha="right")
        ax.set_yticks(range(len(self.labels)), self.labels)
        ax.set_xlabel("decided persona")
        ax.set_ylabel("true persona")
        ax.set_title(f"{self.title}: macro-F1 {self.macro_f1:.3f}, coverage {self.coverage:.2f}")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        fig.tight_layout()
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        tmp.replace(path)


def evaluate(router: PersonaRouter, records: Sequence[RoutingRecord], *, title: str,
             embeddings: np.ndarray | None = None) -> RoutingReport:
    """Score a labelled set (never fitted on) with the router's final decisions."""
    index = {name: i for i, name in enumerate(router.labels)}
    truth = np.array([index[r.persona] for r in records])
    x = router.encoder.encode([r.question for r in records]) if embeddings is None else embeddings
    probs = router.calibration.probabilities(router.classifier.scores(x))
    return report_from_probabilities(router, probs, truth, title=title)


def report_from_probabilities(router: PersonaRouter, probs: np.ndarray, truth: np.ndarray, *,
                              title: str) -> RoutingReport:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    index = {name: i for i, name in enumerate(router.labels)}
    decisions = [router.decide_from_probabilities(row) for row in probs]
    decided = np.array([index[d.persona] for d in decisions])
    inferred = np.array([d.source == "inferred" for d in decisions])
    argmax = probs.argmax(axis=1)
    every = list(range(len(router.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, decided, labels=every, zero_division=0)
    per_persona = {name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                          "f1": round(float(f1[i]), 4), "support": int(support[i])}
                   for i, name in enumerate(router.labels)}
    return RoutingReport(
        title=title, labels=router.labels, n=int(truth.size),
        accuracy=round(float((decided == truth).mean()), 4),
        macro_f1=round(float(f1_score(truth, decided, labels=every, average="macro", zero_division=0)), 4),
        coverage=round(float(inferred.mean()), 4),
        inferred_precision=round(float((decided[inferred] == truth[inferred]).mean()), 4) if inferred.any() else None,
        argmax_accuracy=round(float((argmax == truth).mean()), 4),
        argmax_macro_f1=round(float(f1_score(truth, argmax, labels=every, average="macro", zero_division=0)), 4),
        per_persona=per_persona,
        confusion=confusion_matrix(truth, decided, labels=every).tolist(),
    )


def fmt_optional(value: float | None) -> str:
    """A report number to 3 decimals, ``-`` when it does not exist (no decision was inferred)."""
    return "-" if value is None else f"{value:.3f}"
