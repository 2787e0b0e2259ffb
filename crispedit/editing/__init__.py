"""Editing: projected fine-tuning of target layers (CrispEdit), its sequential variant, baselines, deltas."""
