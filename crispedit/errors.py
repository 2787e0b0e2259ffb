"""The exception and warning classes of crispedit, in one place.

Policy (the CLI relies on it):

- `CrispEditError` and its subclasses mean "the input or the environment is wrong": a bad file, an unknown
  layer, a cache computed for other weights. The CLI prints them as one line (`--debug` adds the traceback).
  Everything else that escapes the library is a bug and keeps its traceback.
- Errors that subclass a built-in as well (`ConfigError` is a `ValueError`) can be caught either way.
- Library messages name Python parameters (`allow_mismatch=True`), never command-line flags. Errors that a
  caller may want to react to carry structured fields (`CacheMismatchError.diffs`, `ConfigError.field`), and
  `CrispEditError.hint` names the parameter that would fix the problem, so the CLI can say it in its own terms
  (`crispedit.cli.common.PARAMETER_FLAGS`).
- User-actionable oddities that do not stop the work are `warnings.warn(..., CrispEditWarning)`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


class CrispEditError(Exception):
    """A problem with the user's input or environment (bad file, unknown layer, mismatched cache...).

    Args:
        message: what was wrong, the value, and what is allowed. When `params` is given, `{name}` fields in it
            are filled with the parameter settings, spelled for the reader (see `render`).
        params: settings the message talks about, `{parameter: value}`.
        hint: how to fix it, as `{parameter: value}` (`...` for "some value"), appended as "; pass
            allow_mismatch=True" (or as `hint_text` says, with `{fix}` where the settings go).
        hint_text: the sentence that introduces the hint.
    """

    def __init__(self, message: str = "", *, params: dict[str, Any] | None = None,
                 hint: dict[str, Any] | None = None, hint_text: str = "pass {fix}") -> None:
        self.message = message
        self.params = dict(params or {})
        self.hint = dict(hint or {})
        self.hint_text = hint_text
        super().__init__(self.render())

    def render(self, spell: Callable[[str, Any], str] | None = None) -> str:
        """The message with its settings spelled by `spell(parameter, value)`: Python keywords by default
        (`allow_mismatch=True`, `curvature=...`); the CLI passes its flag spelling (`--allow-cache-mismatch`)."""
        spell = spell or _python_spelling
        text = self.message
        if self.params:
            text = text.format(**{k: spell(k, v) for k, v in self.params.items()})
        if self.hint:
            fix = ", ".join(spell(k, v) for k, v in self.hint.items())
            text = f"{text}; {self.hint_text.format(fix=fix)}"
        return text


def _python_spelling(name: str, value: Any) -> str:
    return f"{name}=..." if value is ... else f"{name}={value!r}"


class ConfigError(CrispEditError, ValueError):
    """An invalid configuration value. `field` and `value` say which (the class name is in the message)."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, **kw: Any) -> None:
        self.field = field
        self.value = value
        super().__init__(message, **kw)


class NoTargetModulesError(CrispEditError, ValueError):
    """A target name or pattern does not select any editable (Linear/Conv1D) layer."""


class CacheMismatchError(CrispEditError):
    """The cache was computed for another model, other weights or other target layers.

    `diffs` lists the differing fields as 'field: cache=... model=...'."""

    def __init__(self, message: str, *, diffs: Sequence[str] = (), **kw: Any) -> None:
        self.diffs = list(diffs)
        super().__init__(message, **kw)


class DivergenceError(CrispEditError):
    """Training produced NaN/inf; the weights were restored to their values before the run."""


class OutputError(CrispEditError):
    """An output location the job must not or cannot write: one of its inputs, a folder crispedit did not write,
    an unwritable place (crispedit.io)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output folder or file exists and overwriting it was not allowed (`overwrite=False`)."""


class WriteError(OutputError):
    """A file or folder could not be written (no space, read-only, no permission); the message names it."""


class CacheIntegrityError(CrispEditError):
    """A curvature cache's files are not the ones its record describes, or hold impossible values."""


class CrispEditWarning(UserWarning):
    """Something the user may want to act on that does not stop the work (skipped records, a corpus that can
    no longer be reconstructed...)."""


__all__ = [
    "CacheIntegrityError",
    "CacheMismatchError",
    "ConfigError",
    "CrispEditError",
    "CrispEditWarning",
    "DivergenceError",
    "NoTargetModulesError",
    "OutputError",
    "OutputExistsError",
    "WriteError",
]
