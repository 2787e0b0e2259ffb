"""The one canonical edit record that every reader produces and every consumer takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from crispedit.errors import CrispEditError


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


def check_requests(requests: Sequence[EditRequest]) -> None:
    """Every request is an EditRequest with a non-empty prompt and target (what every editor and evaluator needs
    before any model work); the message names the request and field."""
    if not requests:
        raise CrispEditError("no edit requests given")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise CrispEditError(f"request {i}: expected an EditRequest, got {type(r).__name__}")
        if not r.prompt.strip():
            raise CrispEditError(f"request {i} (case_id={r.case_id}): field 'prompt' is empty")
        if not r.target.strip():
            raise CrispEditError(f"request {i} (case_id={r.case_id}): field 'target' is empty")
