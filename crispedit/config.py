"""Configuration of every stage: frozen, validated dataclasses, the one place where each default lives.

Each field is declared with `option(default, help, ...)`: the help text and the allowed values live in the
field's metadata, so the same declaration validates Python values (`__post_init__` raises `ConfigError`, a
`ValueError`, naming the field and the value), documents the field, and generates the command-line flag
(`crispedit.cli.common.add_config_options`). Adding a field to a config therefore adds its CLI flag, its
config-file key and its entry in every record that stores the config.

Choices are `str` enums (`Choice`): a member equals, hashes and formats as its string value, so `"ft"` and
`Method.FT` are interchangeable in Python, in JSON and on the command line.

`to_dict()` gives plain JSON values (what records store); `dumps()`/`loads()` add `crispedit_version` and
the config's name, and `from_dict` drops keys it does not know with a `CrispEditWarning` (a record written by
a newer crispedit still loads), so configs round-trip across versions.

This module imports neither torch nor transformers: the CLI builds its parser from it instantly.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import sys
import types
import typing
import warnings
from dataclasses import MISSING, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, TypeVar

from crispedit import __version__
from crispedit.errors import ConfigError, CrispEditError, CrispEditWarning

CONFIG_FORMAT_VERSION = 1
C = TypeVar("C", bound="ConfigBase")


# ------------------------------------------------------------------------------------------ choices


class Choice(str, enum.Enum):
    """A string enum whose members behave as their values in f-strings, JSON, comparisons and dict keys."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Labels(Choice):
    """Which output gradients enter S (curvlinops' `FisherType`: mc / empirical / type-2)."""

    SAMPLED = "sampled"  # labels drawn from the model: Gauss-Newton / true Fisher (curvlinops "mc")
    EMPIRICAL = "empirical"  # the data's next tokens: empirical Fisher (the authors' code)
    EXACT = "exact"  # every column of the output Hessian's square root (curvlinops "type-2"; small outputs)


class Scope(Choice):
    """Where the energy threshold γ is applied."""

    LAYER = "layer"
    GLOBAL = "global"


class Method(Choice):
    """Edit methods; every method runs through the same edit loop and differs in the projection (or, for LoRA,
    the parametrisation) only."""

    CRISPEDIT = "crispedit"
    FT = "ft"
    ADAM_NSCL = "adam-nscl"
    LORA = "lora"
    LOCBF_FT = "locbf-ft"


class ProjectionMode(Choice):
    """How Adam and the projector are combined (see `crispedit.editing.optim`)."""

    EIGEN = "eigen"
    UPDATE = "update"
    GRAD = "grad"


class Context(Choice):
    """How a prompt is presented: as is, inside the QA context, or as the chat template's user turn; `auto` (for
    evaluation) is qa, chat when the tokenizer has a template, and raw."""

    RAW = "raw"
    QA = "qa"
    CHAT = "chat"
    AUTO = "auto"


class LossReduction(Choice):
    """How the edit loss averages: over all target tokens, or per sequence first (each sequence counts once)."""

    TOKEN = "token"
    SEQUENCE = "sequence"


class AdamScale(Choice):
    """Where Adam's second moment is kept: per coordinate (Adam) or one per target weight."""

    COORDINATE = "coordinate"
    LAYER = "layer"


class LRSchedule(Choice):
    """How the learning rate moves over the edit's step budget."""

    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class Eigenvalues(Choice):
    """Which eigenvalues rank the Kronecker eigen-directions for the γ threshold."""

    KFAC = "kfac"
    EKFAC = "ekfac"


class EditPositions(Choice):
    """Where the edited weights' change acts while the edit is trained: at every token, or only at the subject's
    tokens (ROME/MEMIT's key: the subject's representation carries the fact, the template's does not)."""

    ALL = "all"
    SUBJECT = "subject"
    SUBJECT_LAST = "subject-last"
    AUTO = "auto"  # by method and number of requests (`EditConfig.positions_for`)


class TargetEnd(Choice):
    """What ends a training target. eos: the end token (EOS; the end of turn in the chat template). none: nothing.
    turn: the end of turn in the chat template, nothing elsewhere (EOS in raw text is not a natural end, and a model
    trained on it starts unseen question formats with EOS). period: the end of turn in chat, a period elsewhere
    (the sentence's natural end; none where the target already ends with . ! or ?)."""

    EOS = "eos"
    NONE = "none"
    TURN = "turn"
    PERIOD = "period"


class EditStatistics(Choice):
    """Where CrispEdit-Seq counts a finished chunk's edit sequences in the accumulated statistics: at every
    position (the paper's Appendix E), or only where the change acted while training (`EditConfig.edit_positions`:
    the subject's last token by default), the keys an earlier edit is read from."""

    SEQUENCE = "sequence"
    EDIT_POSITIONS = "edit-positions"


class DType(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    AUTO = "auto"


class Benchmark(Choice):
    """Multiple-choice benchmarks scored by option log-likelihood."""

    MMLU = "mmlu"
    ARC = "arc"
    TRUTHFULQA = "truthfulqa"


# What each method projects with (None: unconstrained). A new method adds one member above and one entry here.
PROJECTION_FOR_METHOD: dict[str, str | None] = {Method.CRISPEDIT: "kfac", Method.ADAM_NSCL: "nscl", Method.FT: None,
                                                Method.LOCBF_FT: None, Method.LORA: None}


# ------------------------------------------------------------------------------------------ fields


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
           low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           choices: tuple[str, ...] | None = None, cli_choices: tuple[str, ...] | None = None, cli: bool = True,
           metavar: str | None = None, const_flags: Mapping[str, Any] | None = None, type: Any = None,
           off_help: str | None = None, noun: str | None = None) -> Any:
    """A dataclass field with its documentation and constraints in `metadata`.

    Args:
        default: the default (the only place it is written).
        help: one sentence for `--help` and the docs.
        flag: the command-line flag when it is not `--field-name` (e.g. `--layers` for `targets`).
        aliases: further spellings of the flag (old names kept working).
        low, high, low_open, high_open: numeric bounds (closed unless `*_open`).
        choices: allowed values when only some members of the field's enum are.
        cli_choices: the values the command line offers, when fewer than Python accepts.
        cli: False keeps the field off the command line.
        metavar: the placeholder in `--help`.
        const_flags: extra flags that set a constant, e.g. `{"--chat-template": "chat"}`.
        type: the value type when the annotation is not a simple one (`str`, `int`, `float`, `bool`, an enum,
            their `| None` and `tuple[..., ...]` forms).
        off_help: for a field that defaults to True, the help of its `--no-...` flag.
        noun: what one value is called in messages ("unknown training context 'wild'"; default "value").
    """
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "choices": choices, "cli_choices": cli_choices, "cli": cli,
            "metavar": metavar, "const_flags": dict(const_flags or {}), "type": type, "off_help": off_help,
            "noun": noun}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as a config default")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """What `option` declared about one field, with its annotation resolved."""

    name: str
    kind: type  # int, float, bool, str or a Choice subclass
    optional: bool  # None is allowed
    many: bool  # a tuple of `kind`
    default: Any
    meta: Mapping[str, Any]

    @property
    def help(self) -> str:
        return self.meta.get("help", "")

    @property
    def allowed(self) -> tuple[str, ...] | None:
        if self.meta.get("choices"):
            return tuple(str(c) for c in self.meta["choices"])
        return self.kind.values() if issubclass(self.kind, Choice) else None

    def describe(self) -> str:
        """What values are allowed, e.g. 'a positive integer', 'a number in (0, 1]'."""
        lo, hi = self.meta.get("low"), self.meta.get("high")
        if self.kind is int and hi is None and lo in (0, 1):
            return "a positive integer" if lo == 1 else "a non-negative integer"
        if self.kind is float and hi is None and lo == 0 and self.meta.get("low_open"):
            return "a positive number"
        if lo is not None and hi is not None:
            return f"a number in {self.interval()}"
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(self.kind, "a value")

    def interval(self) -> str:
        lo, hi = self.meta.get("low"), self.meta.get("high")
        left = "(" if self.meta.get("low_open") else "["
        right = ")" if self.meta.get("high_open") else "]"
        return f"{left}{lo:g}, {hi:g}{right}"


def _resolve_annotation(owner: type, f: dataclasses.Field) -> Any:
    if f.metadata.get("type") is not None:
        return f.metadata["type"]
    if not isinstance(f.type, str):
        return f.type
    namespace = dict(vars(sys.modules[owner.__module__]))
    namespace.update(vars(sys.modules[__name__]))
    return eval(f.type, namespace)  # noqa: S307 - our own annotations, resolved once per class


def _unpack(annotation: Any) -> tuple[type, bool, bool]:
    """(kind, optional, many) of `int`, `int | None`, `tuple[str, ...]`, `Method | None`..."""
    optional = many = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is tuple:
        many = True
        annotation = typing.get_args(annotation)[0]
    if not (annotation in (int, float, bool, str) or (isinstance(annotation, type) and issubclass(annotation, Choice))):
        raise TypeError(f"unsupported config annotation {annotation!r}")
    return annotation, optional, many


@lru_cache(maxsize=None)
def config_fields(cls: type) -> tuple[FieldSpec, ...]:
    """The documented fields of a dataclass (those declared with `option`), in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, optional, many = _unpack(_resolve_annotation(cls, f))
        out.append(FieldSpec(f.name, kind, optional, many, f.default, f.metadata))
    return tuple(out)


def _scalar(spec: FieldSpec, value: Any) -> Any:
    """One value converted to the field's kind and checked; raises ValueError with a message sans field name."""
    kind = spec.kind
    if issubclass(kind, Choice):
        noun = spec.meta.get("noun") or "value"
        try:
            value = kind(str(value.value if isinstance(value, enum.Enum) else value))
        except ValueError:
            raise ValueError(f"unknown {noun} {str(value)!r}; expected one of {', '.join(spec.allowed or ())}") from None
        if spec.allowed and value.value not in spec.allowed:
            raise ValueError(f"unknown {noun} {value.value!r}; expected one of {', '.join(spec.allowed)}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind is str:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {spec.describe()}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected {spec.describe()}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    lo, hi, meta = spec.meta.get("low"), spec.meta.get("high"), spec.meta
    below = lo is not None and (value <= lo if meta.get("low_open") else value < lo)
    above = hi is not None and (value >= hi if meta.get("high_open") else value > hi)
    if below or above or (isinstance(value, float) and math.isnan(value)):
        what = spec.describe()
        if what.startswith("a number in "):
            what = "in " + what[len("a number in "):]
        raise ValueError(f"must be {what}, got {value:g}")
    return value


def check_value(spec: FieldSpec, value: Any) -> Any:
    """`value` converted to the field's type (str → enum, list → tuple...) and checked against its bounds.

    Raises:
        ValueError: with a message that does not name the field (callers add it).
    """
    if value is None:
        if spec.optional:
            return None
        raise ValueError("must not be None")
    if spec.many:
        if isinstance(value, str):
            value = [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return tuple(_scalar(spec, v) for v in value)
    return _scalar(spec, value)


def parse_text(spec: FieldSpec, text: str) -> Any:
    """A command-line string converted and checked (comma lists for tuple fields, 'none' for None)."""
    if spec.optional and text.strip().lower() == "none":
        return None
    if spec.many or spec.kind in (str,) or issubclass(spec.kind, Choice):
        return check_value(spec, text)
    if spec.kind is bool:
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low in ("true", "1", "yes")
    try:
        value = int(text) if spec.kind is int else float(text)
    except ValueError:
        raise ValueError(f"expected {spec.describe()}, got {text!r}") from None
    return check_value(spec, value)


def _plain(value: Any) -> Any:
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ base class


class ConfigBase:
    """Validation, JSON round trip and `replace` for the frozen config dataclasses below."""

    def __post_init__(self) -> None:
        for spec in config_fields(type(self)):
            value = getattr(self, spec.name)
            try:
                checked = check_value(spec, value)
            except ValueError as e:
                sep = " " if str(e).startswith("must") else ": "  # "X.gamma must be ...", "X.method: unknown ..."
                raise ConfigError(f"{type(self).__name__}.{spec.name}{sep}{e}", field=spec.name, value=value) from None
            if checked is not value:
                object.__setattr__(self, spec.name, checked)
        self._validate()

    def _validate(self) -> None:
        """Checks across fields (override)."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values by field name (enum members as strings, tuples as lists), in declaration order."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """Same as `to_dict` (the form records store)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str | None = None) -> C:
        """A config from a mapping such as `to_dict()` or a record. Keys this version does not know are dropped
        with a `CrispEditWarning` (a record written by a newer crispedit still loads); missing keys take
        their defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source or cls.__name__}: expected a mapping of {cls.__name__} fields, "
                              f"got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("config", cls.__name__)
        written_by = data.pop("crispedit_version", None)
        data.pop("format_version", None)
        if kind != cls.__name__:
            raise ConfigError(f"{source or 'config'}: holds a {kind}, not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            by = f" (written by crispedit {written_by})" if written_by else ""
            warnings.warn(f"{source or cls.__name__}: ignoring unknown {cls.__name__} field(s) {', '.join(unknown)}"
                          f"{by}", CrispEditWarning, stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})

    def dumps(self) -> str:
        """Versioned JSON text: `{"config": name, "crispedit_version": ..., "format_version": 1, fields...}`."""
        head = {"config": type(self).__name__, "crispedit_version": __version__,
                "format_version": CONFIG_FORMAT_VERSION}
        return json.dumps({**head, **self.to_dict()}, indent=2) + "\n"

    @classmethod
    def loads(cls: type[C], text: str, *, source: str | None = None) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CrispEditError(f"{source or cls.__name__}: invalid JSON at line {e.lineno} column {e.colno}: "
                                 f"{e.msg}") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | Path) -> Path:
        from crispedit.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.dumps())
        return Path(path)

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        p = Path(path)
        if not p.is_file():
            raise CrispEditError(f"config file not found: {p}")
        return cls.loads(p.read_text(encoding="utf-8"), source=str(p))


# ------------------------------------------------------------------------------------------ stages

# The paper's Table 2 cap on passes over the edit requests; `EditConfig.epochs` left at None means this many, or more
# whole passes until `EditConfig.min_steps` steps have run (`crispedit.editing.engine.planned_epochs`).
DEFAULT_EPOCHS = 25
# Requests edited at once from which `edit_positions` auto trains a projecting method at every token. Measured on
# SmolLM2 with CounterFact (docs/scale.md, README): at 100 and 300 edits subject-last trades capability for the
# neighbours' answers and rephrases, at 500 it already costs +31 % perplexity in 400 steps, at 1,000 every token
# fits more edits at a seventeenth of the KL and keeps about as many neighbours; every token was not measured at 500.
AUTO_ALL_FROM = 500

LAYERS_HELP = ("target layers: a module path, a template such as 'model.layers.{10-14}.mlp.down_proj', "
               "a regex, or several separated by commas (default: the model type's defaults)")


@dataclass(frozen=True)
class LoadConfig(ConfigBase):
    """How a model is loaded (`crispedit.load_model(spec, **cfg.to_dict())`)."""

    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: DType = option(DType.FLOAT32, "weights' dtype")
    device_map: str | None = option(None, "passed to from_pretrained, e.g. 'auto' to spread a large model over "
                                          "the GPUs")
    trust_remote_code: bool = option(False, "allow the checkpoint's own Python code (off by default)")


@dataclass(frozen=True)
class RequestsConfig(ConfigBase):
    """How edit requests are read (`load_requests(path, fmt=cfg.format, limit=cfg.limit, ...)`)."""

    format: str = option("auto", "auto (detected), counterfact, zsre, wikibigedit or crispedit")
    limit: int | None = option(None, "use the first N requests", low=1, metavar="N")
    skip_invalid: bool = option(False, "drop invalid records with a warning instead of stopping")


@dataclass(frozen=True)
class CorpusConfig(ConfigBase):
    """Which capability text, cut how (`crispedit.build_corpus(tokenizer, **cfg.to_dict())`)."""

    source: str | None = option(None, "capability corpus: a .txt file (one document per non-empty line), a .jsonl "
                                      "file (a text field per line), a folder of those, a MediaWiki .xml.bz2 dump, "
                                      "or 'wikipedia' (default: the embedded Wikipedia excerpt)",
                                flag="--corpus", metavar="PATH")
    n_samples: int | None = option(200, "corpus chunks (sequences) to take", flag="--samples", low=1)
    max_length: int = option(256, "tokens per chunk, at most", low=1)
    seed: int = option(0, "chooses the corpus chunks", low=0)
    heldout_fraction: float = option(0.1, "share of the corpus's documents kept out of the curvature for "
                                          "evaluation", low=0.0, high=1.0, high_open=True)
    text_field: str = option("text", "the field holding the text in .jsonl corpora")


@dataclass(frozen=True)
class CurvatureConfig(ConfigBase):
    """How the capability curvature (K-FAC statistics) is collected.

    `sink_tokens=1` keeps each sequence's first position (an attention sink whose activations can be ~100x
    larger than the rest and otherwise dominate A) apart: its input directions are removed from the editable
    subspace outright instead of swamping the energy threshold. This is the one default for every entry
    point, `collect_lm_stats` included."""

    targets: str | None = option(None, LAYERS_HELP, flag="--layers", metavar="SPEC")
    labels: Labels = option(Labels.SAMPLED, "sampled: labels drawn from the model (Gauss-Newton/true Fisher, the "
                                            "paper's curvature); empirical: the corpus's next tokens; exact: every "
                                            "column of the output Hessian's square root (small vocabularies only)",
                            cli_choices=("sampled", "empirical"))
    mc_samples: int = option(1, "sampled labels per position", low=1)
    seed: int = option(0, "seed of the sampled labels (the CLI also uses it to choose the corpus chunks)", low=0)
    sink_tokens: int = option(1, "leading positions per sequence kept out of A (attention sinks); their input "
                                 "directions are never edited", low=0)
    sink_energy: float = option(0.99, "share of the sink positions' energy whose directions are removed",
                                low=0.0, high=1.0, low_open=True)
    batch_size: int = option(8, "sequences per forward/backward pass", low=1)
    max_tokens: int | None = option(4096, "padded tokens per batch, at most (batches are split to fit)", low=1)

    # Settings that define what a cache's sums mean: an extension or a merge must keep the cache's own.
    COLLECTION_FIELDS = ("labels", "mc_samples", "sink_tokens", "sink_energy")

    def collection_record(self) -> dict[str, Any]:
        """What a cache records about its collection (the resolved targets are recorded separately)."""
        d = self.to_dict()
        d.pop("targets")
        return d

    def collect_config(self) -> "CurvatureConfig":
        """Kept for callers written when collection had its own config class: the config itself."""
        return self


# One config for the whole stage: `CollectConfig` was the collection-only half and had its own sink default.
CollectConfig = CurvatureConfig


@dataclass(frozen=True)
class EditConfig(ConfigBase):
    """Editing hyper-parameters (recorded verbatim in every delta).

    Defaults: the paper's Table 2 (Adam, batch 32, ≤25 epochs, stop when the epoch-mean edit loss < 0.01)
    except γ = 0.9, lr = 5e-3 and a floor of 400 steps under the default epochs (an epoch of a few requests is a
    few steps, and Adam needs a number of steps, not of passes, to fit them), measured on the embedded model
    (README, results): with Adam in the masked eigenbasis every kept coordinate moves ~lr per step, and at lr
    1e-3 / γ 0.99 a 25-step budget barely lowers the edit loss (12.5 → 10.6 on 20 CounterFact edits, 0 %
    reliability). For the projected methods below `AUTO_ALL_FROM` requests the change acts at the subject's last token
    while training (`edit_positions` auto): at every token, the edit also rewrote how the model answers any question
    in the trained contexts (first-token locality 0.05 against 0.80 in the QA context, 20 CounterFact edits; README,
    results); with more requests at once it acts at every token (`positions_for`).

    A new hyper-parameter is one more field here (`option(default, help, ...)`): validation, the CLI flag
    of `crispedit edit`, config-file keys and the delta record follow from it."""

    method: Method = option(Method.CRISPEDIT, "crispedit: K-FAC low-curvature projection; adam-nscl: null space "
                                              "of the activation covariance A; ft and locbf-ft: unconstrained "
                                              "fine-tuning; lora: low-rank adapters (same loop)")
    gamma: float = option(0.9, "energy threshold γ in (0, 1)", low=0.0, high=1.0, low_open=True, high_open=True)
    scope: Scope = option(Scope.LAYER, "energy threshold per target layer or across all targets")
    projection_mode: ProjectionMode = option(ProjectionMode.EIGEN, "eigen: Adam in the masked Kronecker "
                                             "eigenbasis (exact); update: project Adam's step; grad: project the "
                                             "gradient before Adam (the authors' code; leaks)")
    lr: float = option(5e-3, "Adam learning rate", low=0.0, low_open=True)
    adam_scale: AdamScale = option(AdamScale.COORDINATE, "Adam's second moment: coordinate (Adam: each kept "
                                   "coordinate moves about lr per step) or layer (one per target: the step follows "
                                   "the momentum, so coordinates the gradient barely reaches barely move)")
    delta_decay: float = option(0.0, "decoupled decay of the change toward the base weights (AdamW's weight decay "
                                     "on ΔW): each step ΔW ← (1 − lr·decay)·ΔW − step, so a coordinate the gradient "
                                     "only jitters stays near √(lr/(2·decay)) however many steps run", low=0.0)
    lr_schedule: LRSchedule = option(LRSchedule.CONSTANT, "constant; cosine or linear: decay the lr to 0 over the "
                                     "step budget (epochs x batches per epoch, or max_steps). Adam moves each kept "
                                     "coordinate about lr per step, so a decay shortens the weights' path")
    epochs: int | None = option(None, f"passes over the edit requests, at most; default: {DEFAULT_EPOCHS}, or more "
                                      "whole passes until min_steps steps have run", low=1)
    min_steps: int = option(400, f"with the default epochs: whole passes are added past {DEFAULT_EPOCHS} until "
                                 "this many steps "
                                 "have run (early stopping still ends the run). 25 passes over a few requests are "
                                 "few steps: 39 WikiBigEdit requests got 175 and fit to loss 0.68, at 400 to 0.01; "
                                 "from about 100 requests on, 25 passes already take 400 steps", low=0)
    batch_size: int = option(32, "training sequences per step", low=1)
    early_stop_loss: float = option(0.01, "stop when an epoch's mean edit loss is below this", low=0.0,
                                    low_open=True)
    max_steps: int | None = option(None, "stop after this many steps", low=1)
    contexts: tuple[Context, ...] = option((Context.AUTO,), "training contexts: each edit is trained under each of "
                                           "raw, qa (the WILD QA context), chat (the chat template); auto = qa, chat "
                                           "(when the tokenizer has a chat template) and raw (comma list)",
                                           choices=("raw", "qa", "chat", "auto"),
                                           const_flags={"--chat-template": ("chat",)}, noun="training context")
    prefixes: int = option(2, "model-written prefixes per request (ROME's context templates) put before the raw "
                              "prompt", low=0)
    anchors: int = option(0, "locality anchors per request and training context: the edit prompt with its subject "
                             "swapped for another request's, trained to keep the base model's next-token "
                             "distribution (top-k) after the prompt", low=0)
    anchor_weight: float = option(1.0, "weight of the anchors' KL term in the edit loss", low=0.0)
    edit_positions: EditPositions = option(EditPositions.AUTO, "where the change of the edited weights "
                                           "acts during training: subject-last: the subject's last token (ROME/"
                                           "MEMIT's key); subject: all of the subject's tokens; all: every token; "
                                           f"auto: subject-last for crispedit and adam-nscl below {AUTO_ALL_FROM} "
                                           "requests at once, all from there on (one position per fact no longer "
                                           "carries that many edits cheaply) and always for ft, lora and locbf-ft "
                                           "(whose change nothing checks at the other tokens). A request whose "
                                           "subject is not in its prompt trains at every token")
    target_end: TargetEnd = option(TargetEnd.EOS, "what ends every training target, so the edited model stops after "
                                                  "the new object: eos: the end token (EOS; the end of turn in "
                                                  "chat); none: nothing; turn: the end of turn in chat, nothing "
                                                  "elsewhere; period: the end of turn in chat, a period elsewhere")
    seed: int = option(0, "seed of the request order and the prefixes")
    cache_prefix: bool = option(True, "cache the hidden states below the first target (exact; faster)",
                                off_help="run the whole forward at every step")
    cache_positions: bool = option(True, "with edit positions, cache the keys/values of the positions before the "
                                         "first one and run the layers from there only (exact; faster; needs "
                                         "cache_prefix)", off_help="run the edited layers over every position")
    target_logits: bool = option(True, "compute logits only at the target positions (exact; faster)",
                                 off_help="compute logits at every position")
    loss_reduction: LossReduction = option(LossReduction.TOKEN, "token: mean over all target tokens; sequence: "
                                                                "mean per sequence first")
    lora_rank: int = option(8, "LoRA rank r (method lora)", low=1)
    lora_alpha: float = option(16.0, "LoRA scale α (ΔW = α/r · B·A; method lora)", low=0.0, low_open=True)
    length_window: int = option(4, "batches of similar length: each run of this many batches is sorted by length "
                                   "before it is cut (0 or 1: plain random batches)", low=0)
    max_kl: float | None = option(None, "KL budget: back the edit off until KL(base||edited) on held-out text is at "
                                        "most this many nats per token", low=0.0, low_open=True)
    budget_samples: int = option(32, "held-out chunks the KL budget is measured on", low=1)
    replay: int = option(0, "capability replay: chunks of capability text (the curvature corpus's training split) "
                            "per step whose next-token KL(base||edited) is added to the edit loss, so the measured "
                            "capability divergence itself constrains training (0: off)", low=0)
    replay_weight: float = option(1.0, "weight λ of the replay KL term in the edit loss", low=0.0)
    replay_samples: int = option(128, "chunks in the replay pool (cycled through in a shuffled order)", low=1)
    replay_length: int = option(128, "tokens per replay chunk, at most (the step's extra cost grows with replay x "
                                     "replay_length)", low=2)
    relinearize: int = option(0, "recollect the capability curvature at the current weights this many times during "
                                 "the edit (evenly over the step budget, on the cache's own corpus) and project "
                                 "from there on, Adam restarted: each layer's constraint then sees the others' "
                                 "change so far (0: the base weights' curvature throughout)", low=0, metavar="N")
    eigenvalues: Eigenvalues = option(Eigenvalues.KFAC, "what ranks the Kronecker eigen-directions for the γ "
                                      "threshold (method crispedit): kfac: the products λ_S·λ_A; ekfac: eigenvalues "
                                      "re-estimated from per-sequence weight gradients on the cache's own text at the "
                                      "start of the edit (EK-FAC, George et al. 2018; on a 300-edit delta K-FAC's "
                                      "quadratic form was half the exact Gauss-Newton one, EK-FAC's within a tenth of it)")

    def _validate(self) -> None:
        if self.method not in PROJECTION_FOR_METHOD:
            raise ConfigError(f"EditConfig.method {self.method!r} has no projection rule", field="method",
                              value=self.method)
        if self.max_kl is not None and not math.isfinite(self.max_kl):
            raise ConfigError(f"EditConfig.max_kl must be a positive number of nats per token, got {self.max_kl}",
                              field="max_kl", value=self.max_kl)
        if self.method == Method.LORA and self.adam_scale != AdamScale.COORDINATE:
            raise ConfigError("EditConfig.adam_scale 'layer' is not implemented for method 'lora'",
                              field="adam_scale", value=self.adam_scale)
        if self.method == Method.LORA and self.delta_decay:
            raise ConfigError("EditConfig.delta_decay is not implemented for method 'lora' (its change is B·A)",
                              field="delta_decay", value=self.delta_decay)
        if self.delta_decay * self.lr >= 1.0:
            raise ConfigError(f"EditConfig.delta_decay × lr must be below 1 (it is the share of ΔW removed per "
                              f"step), got {self.delta_decay} × {self.lr}", field="delta_decay", value=self.delta_decay)
        if self.relinearize and self.projection is None:
            raise ConfigError(f"EditConfig.relinearize needs a projecting method, not {self.method!r}",
                              field="relinearize", value=self.relinearize)
        if self.eigenvalues == Eigenvalues.EKFAC and self.projection != "kfac":
            raise ConfigError(f"EditConfig.eigenvalues 'ekfac' needs method 'crispedit' (the K-FAC projection), not "
                              f"{self.method!r}", field="eigenvalues", value=self.eigenvalues)
        if self.eigenvalues == Eigenvalues.EKFAC and self.relinearize:
            raise ConfigError("EditConfig.eigenvalues 'ekfac' with relinearize is not implemented",
                              field="eigenvalues", value=self.eigenvalues)
        if not self.contexts and self.prefixes == 0:
            raise ConfigError("EditConfig.contexts is empty and prefixes is 0: no training sequences",
                              field="contexts", value=self.contexts)

    @property
    def projection(self) -> str | None:
        """'kfac', 'nscl' or None (unconstrained): what this method projects with."""
        return PROJECTION_FOR_METHOD[self.method]

    def positions_for(self, n_requests: int) -> str:
        """Where the change acts while training `n_requests` requests at once, `auto` resolved: 'all', 'subject'
        or 'subject-last'.

        `auto` trains an unconstrained method (FT, LoRA, LocBF-FT) at every token: the change is trained at the
        positions chosen but acts at every position afterwards, and nothing keeps it harmless at the others (at
        100 CounterFact edits LoRA trained at the subject reached KL 8-10 nats/token against 1.8 at every token,
        FT 0.37 against 0.22; README, "Every method in the wild"). A projecting method is keyed on the subject's
        last token below `AUTO_ALL_FROM` requests, where that keeps the neighbours' answers (first-token QA
        locality 0.74 against 0.03 at 100 edits; at 300, in 400 steps of 32, QA / chat 0.33 / 0.69 against
        0.03 / 0.02, for KL 0.114 against 0.051), and trained at every token from there on, where one position per
        fact no longer carries the edits at a bearable cost: at 500 edits subject-last cost +31 % perplexity, at
        1,000 (400 steps of 96) KL 1.218 against 0.071 at every token, with fewer edits and no more neighbours
        kept (docs/scale.md)."""
        if self.edit_positions != EditPositions.AUTO:
            return str(self.edit_positions)
        if self.projection is None or n_requests >= AUTO_ALL_FROM:
            return str(EditPositions.ALL)
        return str(EditPositions.SUBJECT_LAST)


@dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """Which protocols `evaluate` runs, on how many items, with which seeds and batch sizes."""

    teacher_forced: bool = option(True, "score teacher-forced edit metrics",
                                  off_help="skip the teacher-forced edit metrics")
    teacher_forced_context: Context = option(Context.RAW, "context of the teacher-forced edit metrics",
                                             choices=("raw", "qa", "chat"))
    generated_contexts: tuple[Context, ...] = option((Context.AUTO,), "contexts of the generated edit metrics "
                                                     "(comma list of qa, chat, raw; auto = all three, chat only when "
                                                     "the tokenizer has a chat template)", flag="--contexts")
    max_new_tokens: int = option(40, "tokens generated per prompt, at most", low=1)
    benchmarks: tuple[Benchmark, ...] = option((Benchmark.MMLU, Benchmark.ARC, Benchmark.TRUTHFULQA),
                                               "multiple-choice benchmarks (comma list, or 'none')")
    benchmark_limit: int | None = option(200, "questions per benchmark ('none': all)", low=1)
    benchmark_seed: int = option(0, "chooses the benchmark questions (the CLI also uses it for the held-out "
                                    "corpus)", flag="--seed")
    benchmarks_root: str | None = option(None, "folder with mmlu/ arc/ truthfulqa/ gsm8k/")
    benchmarks_on_base: bool = option(False, "also score the base model on the benchmarks (as '<task>_base')")
    gsm8k: bool = option(False, "also score GSM8K (generated chain of thought, exact match)")
    gsm8k_limit: int | None = option(50, "GSM8K questions ('none': all)", low=1)
    lm_eval_tasks: tuple[str, ...] = option((), "lm-evaluation-harness tasks run on the edited model's folder "
                                                "(comma list; needs the `eval` extra and the tasks' data)")
    batch_size: int = option(16, "sequences per scoring batch", low=1)
    generation_batch_size: int = option(16, "prompts per generation batch", low=1)
    capability_batch_size: int = option(4, "held-out sequences per perplexity/KL batch", low=1)
    show_progress: bool = option(False, "progress bars (the CLI turns them on)", cli=False)


@dataclass(frozen=True)
class DemoConfig(ConfigBase):
    """`crispedit demo`: sizes of the end-to-end run on the embedded defaults. The edit hyper-parameters
    default to `EditConfig`'s."""

    out: str = option("crispedit-demo", "report folder")
    n_edits: int = option(10, "number of edits", low=1, aliases=("--edits",))
    samples: int = option(32, "Wikipedia chunks for the curvature", low=1)
    max_length: int = option(128, "tokens per chunk, at most", low=1)
    heldout_samples: int = option(16, "held-out Wikipedia chunks for perplexity and KL", low=1)
    gamma: float = option(EditConfig.gamma, "energy threshold γ of the CrispEdit run", low=0.0, high=1.0,
                          low_open=True, high_open=True)
    lr: float = option(EditConfig.lr, "learning rate of the CrispEdit run", low=0.0, low_open=True)
    ft_lr: float = option(1e-3, "learning rate of the FT run (FT's best in the README's sweeps)", low=0.0,
                          low_open=True)
    show: int = option(3, "edits whose generations are printed (each context and a rephrase)", low=0)
    epochs: int = option(DEFAULT_EPOCHS, "epochs of both edits, at most (the paper's, without EditConfig's floor of "
                             "min_steps steps: 10 edits fit in their 50 steps, and the first command stays short)",
                         low=1)
    benchmark_limit: int = option(0, "MMLU/ARC items (0: skip)", low=0)
    device: str = option(LoadConfig.device, "cpu, cuda or cuda:N")
    dtype: DType = option(LoadConfig.dtype, "weights' dtype")
    seed: int = option(0, "seed of the corpus chunks, the labels and the edits")


__all__ = [
    "AdamScale",
    "Benchmark",
    "Choice",
    "CollectConfig",
    "ConfigBase",
    "Context",
    "CorpusConfig",
    "CurvatureConfig",
    "DType",
    "DemoConfig",
    "EditConfig",
    "EvalConfig",
    "Labels",
    "LoadConfig",
    "LossReduction",
    "LRSchedule",
    "Eigenvalues",
    "Method",
    "PROJECTION_FOR_METHOD",
    "ProjectionMode",
    "RequestsConfig",
    "Scope",
    "config_fields",
    "option",
]
