"""User-facing errors: one clear line, shown without a traceback by the CLI."""


class CrispEditError(Exception):
    """A problem with the user's input or environment (bad file, unknown layer, mismatched cache...)."""


class DivergenceError(CrispEditError):
    """Training produced NaN/inf; the weights were restored to their values before the run."""
