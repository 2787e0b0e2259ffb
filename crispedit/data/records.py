"""The one canonical edit record that every reader produces and every consumer takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LocalityPrompt:
    """An out-of-scope prompt whose behaviour must not change; `answer` is the dataset's answer if any."""

    prompt: str
    answer: str | None = None


@dataclass(frozen=True)
class EditRequest:
    """Change the model so that `prompt` is completed by `target`.

    `rephrases` test generalisation; `locality` prompts test that nothing else moved.
    `ground_truth` is the answer before the edit (absent for new knowledge).
    """

    prompt: str
    target: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[LocalityPrompt, ...] = ()
    case_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rephrases"] = list(self.rephrases)
        d["locality"] = [asdict(x) for x in self.locality]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EditRequest":
        return cls(
            prompt=d["prompt"],
            target=d["target"],
            subject=d.get("subject"),
            ground_truth=d.get("ground_truth"),
            rephrases=tuple(d.get("rephrases") or ()),
            locality=tuple(LocalityPrompt(**x) for x in (d.get("locality") or ())),
            case_id=d.get("case_id"),
        )
