"""Judges decide whether a generated answer expresses the target (WILD's LLM-as-a-judge is optional).

The default is normalised exact match, which needs nothing but the strings. An LLM judge can be a
local Hugging Face model or an OpenAI-compatible endpoint that the user names; nothing here touches
the network unless the user builds an `OpenAIJudge`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Protocol, runtime_checkable

import torch

from crispedit.errors import CrispEditError
from crispedit.evaluation.text import exact_match, prefix_match

JUDGE_SYSTEM = "You grade answers to questions. Reply with a single word: yes or no."
JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Reference answer: {target}\n"
    "Model's answer: {generation}\n\n"
    "Does the model's answer state the reference answer (the same entity or fact, wording may differ)? "
    "Answer yes or no."
)


@runtime_checkable
class Judge(Protocol):
    """Scores one generation; 1.0 = the generation gives the target, 0.0 = it does not."""

    name: str

    def score(self, question: str, target: str, generation: str) -> float: ...


class ExactMatchJudge:
    """Normalised exact match (lowercase, no punctuation/articles, collapsed whitespace)."""

    name = "exact_match"

    def score(self, question: str, target: str, generation: str) -> float:
        return float(exact_match(generation, target))


class PrefixMatchJudge:
    """The normalised generation starts with the normalised target (at a word boundary)."""

    name = "prefix_match"

    def score(self, question: str, target: str, generation: str) -> float:
        return float(prefix_match(generation, target))


def _yes_no(reply: str) -> float:
    words = reply.strip().lower().lstrip("*\"' ").split()
    return 1.0 if words and words[0].strip(".,!:;") == "yes" else 0.0


class HFJudge:
    """A local causal LM as judge: 1.0 when it puts more probability on "yes" than on "no".

    The question is rendered with the judge's chat template when it has one; the decision is read
    from the next-token logits (no sampling), so the judge is deterministic.
    """

    def __init__(self, model, tokenizer, template: str = JUDGE_TEMPLATE, name: str = "hf_judge"):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self._yes = self._first_ids(["yes", " yes", "Yes", " Yes"])
        self._no = self._first_ids(["no", " no", "No", " No"])

    def _first_ids(self, words: list[str]) -> list[int]:
        ids = {self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words
               if self.tokenizer(w, add_special_tokens=False)["input_ids"]}
        return sorted(ids)

    def _prompt_ids(self, question: str, target: str, generation: str) -> list[int]:
        text = self.template.format(question=question, target=target, generation=generation)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(f"{JUDGE_SYSTEM}\n\n{text}\nReply:")["input_ids"])

    def score(self, question: str, target: str, generation: str) -> float:
        ids = torch.tensor([self._prompt_ids(question, target, generation)],
                           device=next(self.model.parameters()).device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        p_yes = torch.logsumexp(logp[self._yes], 0)
        p_no = torch.logsumexp(logp[self._no], 0)
        return 1.0 if p_yes > p_no else 0.0


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint (`{base_url}/chat/completions`) chosen by the user.

    `base_url` includes the API version, e.g. "http://localhost:8000/v1". The key is read from the
    environment variable `api_key_env` when set (local servers usually need none).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 template: str = JUDGE_TEMPLATE, timeout: float = 60.0, name: str | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.template, self.timeout = model, api_key_env, template, timeout
        self.name = name or f"openai:{model}"

    def score(self, question: str, target: str, generation: str) -> float:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": self.template.format(question=question, target=target,
                                                                 generation=generation)},
            ],
            "temperature": 0,
            "max_tokens": 5,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode())
        except (urllib.error.URLError, OSError) as e:
            raise CrispEditError(f"judge endpoint {self.url} failed: {e}") from e
        except json.JSONDecodeError as e:
            raise CrispEditError(f"judge endpoint {self.url} returned invalid JSON: {e}") from e
        try:
            reply = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise CrispEditError(f"judge endpoint {self.url} returned no choices[0].message.content") from e
        return _yes_no(reply or "")
