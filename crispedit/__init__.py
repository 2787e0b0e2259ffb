"""crispedit: edit language models inside the low-curvature subspace of their capabilities (CrispEdit)."""

__version__ = "0.1.0"

from crispedit.errors import CrispEditError  # noqa: E402

__all__ = ["CrispEditError", "__version__"]
