"""Clean paragraphs from a MediaWiki XML dump: the default capability corpus.

The default dump is the English Wikipedia excerpt shipped inside the `gensim` wheel (real
encyclopaedic prose, offline, no download at run time). We only read its data file — gensim itself
is never imported (it is installed with --no-deps and its dependencies may be absent).
The markup stripper is deliberately simple (regexes plus a brace/bracket scanner): it needs to
produce readable prose for a language-model corpus, not a faithful rendering.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from crispedit.errors import CrispEditError

GENSIM_VERSION = "4.4.0"
DUMP_RELPATH = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_PARAGRAPH_CHARS = 200

# Link namespaces whose [[...]] is not prose (images, categories): dropped with their caption.
_DROP_LINK_PREFIXES = ("file", "image", "media", "category")
# Tags whose whole content is not prose.
_DROP_TAG_CONTENT = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source",
                     "chem", "ce", "imagemap", "hiero", "graph", "templatedata", "mapframe", "table")


def default_dump_path() -> Path:
    """Path of the Wikipedia excerpt inside the installed gensim package (without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CrispEditError(
            "the default capability corpus (a Wikipedia excerpt) comes from the gensim package, which is "
            f"not installed; install it with `pip install --no-deps gensim=={GENSIM_VERSION}` "
            "or pass your own corpus (a .txt, .jsonl or folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / DUMP_RELPATH
    if not path.is_file():
        raise CrispEditError(
            f"the Wikipedia excerpt {path} is missing from the installed gensim package; reinstall it with "
            f"`pip install --no-deps --force-reinstall gensim=={GENSIM_VERSION}`")
    return path


def iter_articles(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Stream (title, wikitext) of the main-namespace, non-redirect pages of a dump (.xml or .xml.bz2)."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as f:
            title, ns, redirect, text = None, None, False, None
            for event, elem in ET.iterparse(f, events=("end",)):
                tag = elem.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = elem.text or ""
                elif tag == "ns":
                    ns = (elem.text or "").strip()
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = elem.text or ""
                elif tag == "page":
                    if ns in (None, "0") and not redirect and text and not text.lstrip().upper().startswith("#REDIRECT"):
                        yield title or "", text
                    title, ns, redirect, text = None, None, False, None
                    elem.clear()
    except ET.ParseError as e:
        line, col = e.position
        raise CrispEditError(f"{path}: not a valid MediaWiki XML dump (line {line}, column {col}): {e}") from e
    except (OSError, EOFError) as e:
        raise CrispEditError(f"{path}: cannot read the dump: {e}") from e


def _remove_balanced(text: str, open_tok: str, close_tok: str) -> str:
    """Remove (possibly nested) open_tok ... close_tok spans; an unclosed span is removed to the end."""
    out = []
    depth = 0
    start = 0
    for m in re.finditer(re.escape(open_tok) + "|" + re.escape(close_tok), text):
        if m.group() == open_tok:
            if depth == 0:
                out.append(text[start:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                start = m.end()
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _remove_tables(text: str) -> str:
    """Remove {| ... |} tables (nested), which open and close at the start of a line."""
    out = []
    depth = 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*:")


def _replace_link(m: re.Match) -> str:
    body = m.group(1)
    target, _, label = body.partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _DROP_LINK_PREFIXES:
        return ""
    if not label and _LANG_PREFIX.match(target.strip()):
        return ""  # interlanguage link
    if label:
        return label.rsplit("|", 1)[-1] if "|" in label else label
    return target.lstrip(":")


def _replace_links(text: str) -> str:
    # Innermost first, so that links inside image captions are resolved before the image is dropped.
    while True:
        new = _INNER_LINK.sub(_replace_link, text)
        if new == text:
            return new
        text = new


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_DROP_TAGS = re.compile(
    r"<(%s)\b[^>]*?/>|<(%s)\b[^>]*>.*?</\2\s*>" % ("|".join(_DROP_TAG_CONTENT), "|".join(_DROP_TAG_CONTENT)),
    re.S | re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_EXT_LINK_LABEL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\]")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^=+.*=+\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:\s]*\)")
_OPEN_PAREN_JUNK = re.compile(r"\(\s*[,;:]?\s+|\(\s*[,;:]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean_wikitext(text: str) -> str:
    """Wikitext → plain text; paragraphs separated by blank lines, one list item per paragraph."""
    text = _COMMENT.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_balanced(text, "{{", "}}")
    text = _remove_tables(text)
    text = _replace_links(text)
    text = _EXT_LINK_LABEL.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _ANY_TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)  # after tag removal: an escaped "&lt;ref&gt;" in the source is literal text

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(_tidy(" ".join(current)))
            current.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        if not line or _HEADING.match(line) or line.startswith(("|", "!", "{|", "|}")):
            flush()  # headings, table remnants and blank lines end a paragraph
        elif _LIST_MARKER.match(line):
            flush()
            current.append(_LIST_MARKER.sub("", line))
            flush()
        else:
            current.append(line)
    flush()
    return "\n\n".join(p for p in paragraphs if p)


def _tidy(p: str) -> str:
    p = _SPACES.sub(" ", p)
    p = _EMPTY_PARENS.sub("", p)  # "(born {{birth date|...}})" leaves "(born )" or "()"
    p = _OPEN_PAREN_JUNK.sub("(", p)
    p = _SPACE_BEFORE_PUNCT.sub(r"\1", p)
    return _SPACES.sub(" ", p).strip()


def _has_markup(p: str) -> bool:
    return any(tok in p for tok in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</"))


def iter_paragraphs(path: str | os.PathLike | None = None,
                    min_chars: int = MIN_PARAGRAPH_CHARS) -> Iterator[str]:
    """Clean paragraphs of at least `min_chars` characters from a dump (default: the gensim excerpt).

    Paragraphs where the simple stripper left markup behind (malformed source) are skipped, not emitted.
    """
    dump = Path(path) if path is not None else default_dump_path()
    for _title, wikitext in iter_articles(dump):
        for p in clean_wikitext(wikitext).split("\n\n"):
            if len(p) >= min_chars and not _has_markup(p):
                yield p


@functools.lru_cache(maxsize=4)
def _paragraphs_cached(path: str, min_chars: int) -> tuple[str, ...]:
    return tuple(iter_paragraphs(path, min_chars))


def wikipedia_paragraphs(path: str | os.PathLike | None = None,
                         min_chars: int = MIN_PARAGRAPH_CHARS) -> list[str]:
    """All clean paragraphs of a dump as a list (memoised in memory: parsing takes ~1-2 s)."""
    dump = Path(path) if path is not None else default_dump_path()
    return list(_paragraphs_cached(str(dump.resolve()), min_chars))
