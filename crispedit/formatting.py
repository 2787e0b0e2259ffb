"""How a prompt and its target become tokens — shared by the edit loss and by evaluation.

The target's tokens are those a generation would produce after the prompt: the prompt is tokenised
alone (exactly what the model sees when asked to generate), and the target is tokenised as its
continuation (with a separating space unless either side already has whitespace), followed by the
end-of-sequence token (the chat template's end-of-turn token when a chat template is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

QA_CONTEXT = "Please answer the question:\n\nQ: {q}\nA:"
CONTEXTS = ("raw", "qa", "chat")
# Chat templates' end-of-turn tokens (ChatML, Llama 3, Gemma); the first one a vocabulary has ends the target.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def resolve_contexts(names, tokenizer) -> tuple[str, ...]:
    """Context names as given, with `auto` = the WILD QA context, the chat template (when the tokenizer has one)
    and the raw prompt. Unknown names and `chat` without a chat template are errors."""
    out: list[str] = []
    for n in names:
        if n == "auto":
            out += ["qa", "chat", "raw"] if has_chat_template(tokenizer) else ["qa", "raw"]
            continue
        if n not in CONTEXTS:
            raise ValueError(f"unknown context {n!r}; expected some of {', '.join(CONTEXTS)} or auto")
        if n == "chat" and not has_chat_template(tokenizer):
            raise ValueError("context 'chat' needs a tokenizer with a chat template; this one has none "
                             "(use raw or qa)")
        out.append(n)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class PromptFormat:
    """`context`: raw prompt, the QA context of WILD, or the tokenizer's chat template (prompt = user turn)."""

    context: str = "raw"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; expected one of {CONTEXTS}")


def render_prompt(tokenizer, prompt: str, fmt: PromptFormat) -> str:
    """The prompt text exactly as the model sees it before generating."""
    if fmt.context == "qa":
        return QA_CONTEXT.format(q=prompt)
    if fmt.context == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; use context 'raw' or 'qa'")
        messages = []
        if fmt.system_prompt:
            messages.append({"role": "system", "content": fmt.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    text = render_prompt(tokenizer, prompt, fmt)
    # A chat template already contains its special tokens.
    return list(tokenizer(text, add_special_tokens=fmt.context != "chat")["input_ids"])


def end_token_id(tokenizer, fmt: PromptFormat) -> int:
    """EOS, or the chat template's end-of-turn token (which is EOS for most instruct tokenizers)."""
    if fmt.context == "chat":
        for tok in END_OF_TURN_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token")
    return int(tokenizer.eos_token_id)


def target_text(prompt_text: str, target: str, fmt: PromptFormat) -> str:
    """The target as the continuation of the rendered prompt (leading space where a word boundary is needed)."""
    if fmt.context == "chat":
        return target.strip()
    if not target or target[0].isspace() or (prompt_text and prompt_text[-1].isspace()):
        return target
    return " " + target


def encode_target(tokenizer, prompt: str, target: str, fmt: PromptFormat = PromptFormat(),
                  add_eos: bool = True, suffix: str = "") -> list[int]:
    """The target's tokens as the rendered prompt's continuation; `suffix` (text, e.g. a period) is tokenised with
    the target so that the tokens are the ones the model would write; `add_eos` appends the format's end token."""
    text = target_text(render_prompt(tokenizer, prompt, fmt), target, fmt) + suffix
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos:
        ids.append(end_token_id(tokenizer, fmt))
    return ids


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        """Next-token targets aligned with input_ids (-100 = no loss): loss on target tokens only (FT-M)."""
        return [-100] * len(self.prompt_ids) + self.target_ids


def span_tokens(tokenizer, text: str, span: tuple[int, int], add_special_tokens: bool = True
                ) -> tuple[list[int], tuple[int, ...]]:
    """Token ids of `text` and the positions of the tokens overlapping its character span `[start, end)` (the
    last one holds the span's last character). Needs a fast tokenizer: a slow one raises NotImplementedError."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    start, end = span
    pos = tuple(t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    return list(enc["input_ids"]), pos


def encode_pair(tokenizer, prompt: str, target: str, fmt: PromptFormat = PromptFormat(),
                add_eos: bool = True, suffix: str = "") -> EncodedPair:
    return EncodedPair(encode_prompt(tokenizer, prompt, fmt),
                       encode_target(tokenizer, prompt, target, fmt, add_eos, suffix))


def collate(sequences: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to a batch; `labels` are HF-style (aligned with input_ids, -100 where no loss), padded with -100."""
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    lab = torch.full((len(sequences), n), -100, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(sequences):
        sl = slice(0, len(s)) if padding_side == "right" else slice(n - len(s), n)
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(list(labels[i]), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out
