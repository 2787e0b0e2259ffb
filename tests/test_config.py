"""crispedit/config.py: validation names field and value, JSON round trips across versions, str enums behave as
strings, one default per setting (CLI flags and the library read the same field)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest

from crispedit import config as C
from crispedit.cli.common import add_config_options, config_from_args, given
from crispedit.errors import ConfigError, CrispEditError, CrispEditWarning

CONFIGS = [C.LoadConfig, C.RequestsConfig, C.CorpusConfig, C.CurvatureConfig, C.EditConfig, C.EvalConfig,
           C.DemoConfig]


def test_the_config_module_does_not_import_torch():
    code = "import sys, crispedit.config, crispedit.cli.common; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_frozen_and_round_trips(cls):
    cfg = cls()
    fields = dataclasses.fields(cls)
    assert fields and all(f.metadata.get("help") for f in fields), "every config field needs help text"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, fields[0].name, getattr(cfg, fields[0].name))
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.loads(cfg.dumps()) == cfg
    head = json.loads(cfg.dumps())
    assert head["config"] == cls.__name__ and head["crispedit_version"] and head["format_version"] == 1
    json.dumps(cfg.to_dict())  # plain JSON values


def test_unknown_keys_warn_and_are_dropped_missing_keys_take_defaults():
    data = {"crispedit_version": "9.9.9", "gamma": 0.5, "temperature_schedule": "cosine"}
    with pytest.warns(CrispEditWarning, match="temperature_schedule.*9.9.9"):
        cfg = C.EditConfig.from_dict(data, source="delta.json")
    assert cfg == C.EditConfig(gamma=0.5)
    with pytest.raises(ConfigError, match="holds a EvalConfig, not a EditConfig"):
        C.EditConfig.loads(C.EvalConfig().dumps())


def test_save_and_load_a_config_file(tmp_path):
    cfg = C.EditConfig(method="lora", lr=1e-3, contexts=("chat", "qa"), loss_reduction="sequence")
    assert C.EditConfig.load(cfg.save(tmp_path / "edit.json")) == cfg
    with pytest.raises(CrispEditError, match="config file not found"):
        C.EditConfig.load(tmp_path / "nope.json")


@pytest.mark.parametrize("cls, kw, fragments", [
    (C.EditConfig, {"gamma": 1.0}, ["EditConfig.gamma", "(0, 1)", "got 1"]),
    (C.EditConfig, {"method": "rome"}, ["EditConfig.method", "'rome'", "crispedit, ft, adam-nscl"]),
    (C.EditConfig, {"epochs": 0}, ["EditConfig.epochs", "positive integer", "got 0"]),
    (C.EditConfig, {"lr": -1.0}, ["EditConfig.lr", "positive number"]),
    (C.EditConfig, {"contexts": ("raw", "wild")}, ["EditConfig.contexts", "unknown training context 'wild'",
                                                  "raw, qa, chat"]),
    (C.EditConfig, {"prefixes": -1}, ["EditConfig.prefixes must be a non-negative integer, got -1"]),
    (C.EditConfig, {"contexts": (), "prefixes": 0}, ["no training sequences"]),
    (C.EditConfig, {"batch_size": 2.5}, ["EditConfig.batch_size", "2.5"]),
    (C.EditConfig, {"gamma": "0.9"}, ["EditConfig.gamma", "'0.9'"]),
    (C.CurvatureConfig, {"labels": "mcc"}, ["CurvatureConfig.labels", "'mcc'", "sampled, empirical, exact"]),
    (C.CurvatureConfig, {"sink_energy": 0.0}, ["CurvatureConfig.sink_energy", "(0, 1]"]),
    (C.CurvatureConfig, {"sink_tokens": -1}, ["CurvatureConfig.sink_tokens", "non-negative integer"]),
    (C.CurvatureConfig, {"mc_samples": None}, ["CurvatureConfig.mc_samples", "None"]),
    (C.CorpusConfig, {"heldout_fraction": 1.0}, ["CorpusConfig.heldout_fraction", "[0, 1)"]),
    (C.EvalConfig, {"benchmarks": ("mmlu", "gsm8k")}, ["EvalConfig.benchmarks", "'gsm8k'"]),
    (C.EvalConfig, {"gsm8k": "yes"}, ["EvalConfig.gsm8k", "true or false"]),
])
def test_invalid_values_raise_a_config_error_naming_field_and_value(cls, kw, fragments):
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert isinstance(e.value, ValueError) and isinstance(e.value, CrispEditError)
    assert e.value.field == next(iter(kw))
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_choices_are_str_enums_that_behave_as_their_strings():
    cfg = C.EditConfig(method="adam-nscl", scope="global")
    assert cfg.method is C.Method.ADAM_NSCL and cfg.method == "adam-nscl"
    assert f"{cfg.method}" == "adam-nscl" and str(cfg.scope) == "global"
    assert {"adam-nscl": 1}[cfg.method] == 1 and cfg.projection == "nscl"
    assert json.dumps({"m": cfg.method}) == '{"m": "adam-nscl"}'
    assert cfg.to_dict()["method"] == "adam-nscl" and type(cfg.to_dict()["method"]) is str
    ev = C.EvalConfig(generated_contexts=["raw"], benchmarks="mmlu,arc")
    assert ev.generated_contexts == ("raw",) and ev.benchmarks == (C.Benchmark.MMLU, C.Benchmark.ARC)
    assert C.EvalConfig(benchmarks="none").benchmarks == ()


def test_every_method_has_a_projection_rule():
    assert set(C.PROJECTION_FOR_METHOD) == set(C.Method)


def test_collection_has_one_config_and_one_sink_default():
    from crispedit.curvature import collect, distributed

    assert C.CollectConfig is C.CurvatureConfig and collect.CollectConfig is C.CurvatureConfig
    assert C.CurvatureConfig().sink_tokens == 1
    for fn in (collect.collect_lm_stats, distributed.collect_lm_stats_distributed):
        assert inspect.signature(fn).parameters["cfg"].default is None  # None -> CurvatureConfig()
    assert "targets" not in C.CurvatureConfig().collection_record()


def test_load_config_defaults_are_load_models_defaults():
    from crispedit.models.loading import load_model

    params = inspect.signature(load_model).parameters
    for name, value in C.LoadConfig().to_dict().items():
        assert params[name].default == value, name


# ------------------------------------------------------------------------------------------ generated options


def _parse(cls, argv, **kw):
    from crispedit.cli.common import CliParser, _prepare, Command, resolve_options

    p = CliParser(prog="t")
    add_config_options(p, cls, **kw)
    spec = _prepare(Command("t", "t", lambda _: None, lambda _: 0), p)
    return resolve_options(spec, p.parse_args(argv), set())


def test_generated_options_use_the_dataclass_defaults_and_checks():
    args = _parse(C.EditConfig, [])
    assert config_from_args(args, C.EditConfig) == C.EditConfig() and given(args, C.EditConfig) == {}
    args = _parse(C.EditConfig, ["--gamma", "0.5", "--method", "ft", "--chat-template", "--max-steps", "none"])
    assert config_from_args(args, C.EditConfig) == C.EditConfig(gamma=0.5, method="ft", contexts=("chat",))
    assert given(args, C.EditConfig) == {"gamma": 0.5, "method": "ft", "contexts": ("chat",), "max_steps": None}
    args = _parse(C.EditConfig, ["--contexts", "raw,qa", "--no-cache-prefix", "--loss-reduction", "sequence"])
    assert config_from_args(args, C.EditConfig) == C.EditConfig(contexts=("raw", "qa"), cache_prefix=False,
                                                                loss_reduction="sequence")
    with pytest.raises(CrispEditError, match="argument --gamma: must be in \\(0, 1\\), got 1.5"):
        _parse(C.EditConfig, ["--gamma", "1.5"])
    args = _parse(C.EvalConfig, ["--contexts", "raw,chat", "--benchmarks", "none", "--no-teacher-forced"])
    cfg = config_from_args(args, C.EvalConfig)
    assert cfg.generated_contexts == ("raw", "chat") and cfg.benchmarks == () and cfg.teacher_forced is False


def test_a_new_config_field_is_a_new_flag():
    @dataclasses.dataclass(frozen=True)
    class Extended(C.EditConfig):
        kl_budget: float | None = C.option(None, "stop when KL(base||edited) exceeds this", low=0.0, low_open=True)

    args = _parse(Extended, ["--kl-budget", "0.05"])
    assert config_from_args(args, Extended).kl_budget == 0.05
    with pytest.raises(CrispEditError, match="argument --kl-budget"):
        _parse(Extended, ["--kl-budget", "0"])
    with pytest.raises(ConfigError, match="Extended.kl_budget"):
        Extended(kl_budget=-1.0)


def test_cli_help_lists_the_generated_flags_with_their_defaults():
    from crispedit.cli import commands
    from crispedit.cli.common import build_parser

    parser, specs = build_parser(commands())
    help_text = specs["edit"].parser.format_help()
    for flag in ("--gamma", "--method", "--projection-mode", "--contexts", "--chat-template", "--layers",
                 "--curvature", "--no-save-model", "--limit", "--format"):
        assert flag in help_text, flag
    assert "(default: 0.9)" in help_text and "(default: crispedit)" in help_text
