"""`python -m crispedit ...` (also what `torchrun ... -m crispedit curvature ...` runs on every rank)."""

from crispedit.cli import main

if __name__ == "__main__":
    main()
