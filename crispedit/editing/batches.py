"""Edit requests → training sequences (prompt + target + end token, loss on the target only: FT-M), under the
configured contexts and prefixes (`crispedit.editing.contexts`)."""

from __future__ import annotations

from typing import Sequence

from crispedit.config import TargetEnd
from crispedit.data.readers import check_control_tokens
from crispedit.data.records import EditRequest
from crispedit.editing.contexts import (
    TrainingSequence,
    drop_leaking_prefixes,
    generate_prefixes,
    training_sequences,
)

from crispedit.errors import CrispEditError
from crispedit.formatting import has_chat_template, resolve_contexts

PREFIX_POOL_MIN = 10


def prefix_pool_size(prefixes_per_request: int) -> int:
    """How many prefixes are generated for a run (each request draws its own from them)."""
    return max(PREFIX_POOL_MIN, 2 * prefixes_per_request) if prefixes_per_request else 0


def training_contexts(tokenizer, contexts: Sequence[str]) -> tuple[str, ...]:
    """The configured training contexts with `auto` resolved for this tokenizer (qa, chat if it has a chat
    template, raw); an explicit chat context on a tokenizer without a chat template is an error."""
    if "chat" in [str(c) for c in contexts] and not has_chat_template(tokenizer):
        raise CrispEditError("training context 'chat' needs a tokenizer with a chat template, and this one has "
                             "none; drop chat from the contexts")
    return resolve_contexts([str(c) for c in contexts], tokenizer)


def build_training(model, tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str], prefixes: int,
                   seed: int, end: TargetEnd | str = TargetEnd.EOS) -> tuple[list[TrainingSequence], list[str]]:
    """The training sequences of `requests` and the prefixes they used (recorded with the edit). `contexts` are
    already resolved (`training_contexts`); `end` is what ends every target (`EditConfig.target_end`)."""
    check_control_tokens(tokenizer, requests)  # `<|im_end|>` in edit text must not become a control token
    pool: list[str] = []
    if prefixes:
        pool = drop_leaking_prefixes(generate_prefixes(model, tokenizer, prefix_pool_size(prefixes), seed=seed),
                                     requests)
    return training_sequences(tokenizer, requests, contexts, pool, min(prefixes, len(pool)), seed, end), pool
