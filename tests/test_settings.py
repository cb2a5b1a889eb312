"""Flags, CHATGLM_WEB_* and GRADIO_SERVER_* variables: precedence, one-line errors for bad values, and the one
declaration (``Settings``) the flags, the variables, the checks, the limits and README's table come from."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from chatglm_web.generation import option
from chatglm_web.settings import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODEL,
    OPTIONS,
    SECRET_ENV_VARS,
    SECRET_SETTINGS,
    Limits,
    Settings,
    SettingsError,
    env_name,
    flag_name,
    options_table,
    parse_settings,
)


def test_flags_env_vars_and_defaults():
    s = parse_settings([], environ={})
    assert (s.model, s.precision, s.host, s.port, s.share, s.model_explicit) == (
        DEFAULT_MODEL, "auto", "127.0.0.1", 7860, False, False)
    env = {"CHATGLM_WEB_MODEL": "/m", "CHATGLM_WEB_PRECISION": "4bit", "CHATGLM_WEB_PORT": "9000",
           "CHATGLM_WEB_SHARE": "true", "CHATGLM_WEB_AUTH": "a:b", "CHATGLM_WEB_MAX_INPUT_TOKENS": "512"}
    s = parse_settings([], environ=env)
    assert (s.model, s.precision, s.port, s.share, s.auth_pair, s.max_input_tokens) == ("/m", "4bit", 9000, True, ("a", "b"), 512)
    assert s.model_explicit
    s = parse_settings(["--precision", "fp16", "--port", "1234", "--no-share", "--device", "cpu"], environ=env)
    assert (s.precision, s.port, s.share, s.device) == ("fp16", 1234, False, "cpu")  # flags win


def test_gradio_server_variables_are_honoured_below_ours():
    """Hugging Face Spaces sets GRADIO_SERVER_NAME/PORT: flag > CHATGLM_WEB_* > GRADIO_SERVER_* > default."""
    gradio = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    s = parse_settings([], environ=gradio)
    assert (s.host, s.port) == ("0.0.0.0", 7861)
    ours = {**gradio, "CHATGLM_WEB_HOST": "10.0.0.5", "CHATGLM_WEB_PORT": "7862"}
    s = parse_settings([], environ=ours)
    assert (s.host, s.port) == ("10.0.0.5", 7862)
    s = parse_settings(["--host", "127.0.0.2", "--port", "7863"], environ=ours)
    assert (s.host, s.port) == ("127.0.0.2", 7863)
    with pytest.raises(SettingsError, match="GRADIO_SERVER_PORT='x' is not a whole number"):
        parse_settings([], environ={"GRADIO_SERVER_PORT": "x"})


@pytest.mark.parametrize("text,value", [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True),
                                        ("false", False), ("0", False), ("no", False), ("off", False)])
def test_booleans_in_any_usual_spelling(text, value):
    assert parse_settings([], environ={"CHATGLM_WEB_SHARE": text}).share is value


@pytest.mark.parametrize("text", ["ture", "2", "enabled", ""])
def test_an_invalid_boolean_is_rejected_not_read_as_false(text):
    with pytest.raises(SettingsError, match="CHATGLM_WEB_SHARE"):
        parse_settings([], environ={"CHATGLM_WEB_SHARE": text})


def test_max_new_tokens_stays_within_the_sampling_range():
    spec = option("max_new_tokens")
    assert parse_settings(["--max-new-tokens", str(spec.maximum)], environ={}).max_new_tokens == spec.maximum
    assert parse_settings([], environ={"CHATGLM_WEB_MAX_NEW_TOKENS": str(spec.minimum)}).max_new_tokens == spec.minimum
    for value in (spec.minimum - 1, spec.maximum + 1):
        with pytest.raises(SettingsError, match=f"--max-new-tokens must be between {spec.minimum} and {spec.maximum}"):
            parse_settings(["--max-new-tokens", str(value)], environ={})
    with pytest.raises(SettingsError, match="CHATGLM_WEB_MAX_NEW_TOKENS"):
        parse_settings([], environ={"CHATGLM_WEB_MAX_NEW_TOKENS": str(spec.maximum + 1)})


@pytest.mark.parametrize("argv,env,named", [
    (["--precision", "int3"], {}, "--precision must be one of auto, 4bit"),
    ([], {"CHATGLM_WEB_PRECISION": "int3"}, "CHATGLM_WEB_PRECISION must be one of"),
    ([], {"CHATGLM_WEB_PORT": "abc"}, "CHATGLM_WEB_PORT='abc' is not a whole number"),
    (["--port", "70000"], {}, "--port must be between 0 and 65535"),
    ([], {"CHATGLM_WEB_MAX_BATCH_SIZE": "0"}, "CHATGLM_WEB_MAX_BATCH_SIZE must be at least 1"),
    ([], {"CHATGLM_WEB_MAX_QUEUE": "1.5"}, "CHATGLM_WEB_MAX_QUEUE='1.5' is not a whole number"),
    (["--auth", "nopassword"], {}, "--auth must look like user:password"),
    ([], {"CHATGLM_WEB_AUTH": "user:"}, "CHATGLM_WEB_AUTH must look like user:password"),
    (["--device", "cuda:x"], {}, "--device must be"),
    ([], {"CHATGLM_WEB_MODEL": ""}, "CHATGLM_WEB_MODEL is empty"),
    ([], {"CHATGLM_WEB_HOST": " "}, "CHATGLM_WEB_HOST is empty"),
    (["--prot", "80"], {}, "unrecognized arguments: --prot 80"),
])
def test_bad_settings_are_one_line_naming_the_flag_or_variable(argv, env, named):
    with pytest.raises(SettingsError) as caught:
        parse_settings(argv, environ=env)
    message = str(caught.value)
    assert named in message and "\n" not in message


def test_an_empty_value_means_none_where_none_is_allowed():
    s = parse_settings([], environ={"CHATGLM_WEB_AUTH": "", "CHATGLM_WEB_MAX_INPUT_TOKENS": "", "CHATGLM_WEB_ASSETS_DIR": ""})
    assert (s.auth_pair, s.max_input_tokens, s.assets_dir) == (None, None, None)


def test_help_lists_every_variable_and_exits_0(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--help"], environ={})
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("CHATGLM_WEB_MODEL", "CHATGLM_WEB_SHARE", "CHATGLM_WEB_HOST, then GRADIO_SERVER_NAME",
                 "CHATGLM_WEB_PORT, then GRADIO_SERVER_PORT"):
        assert name in text


def test_code_interpreter_is_an_off_by_default_strict_boolean():
    assert parse_settings([], environ={}).code_interpreter is False
    assert parse_settings(["--code-interpreter"], environ={}).code_interpreter is True
    assert parse_settings([], environ={"CHATGLM_WEB_CODE_INTERPRETER": "yes"}).code_interpreter is True
    assert parse_settings(["--no-code-interpreter"], environ={"CHATGLM_WEB_CODE_INTERPRETER": "1"}).code_interpreter is False
    with pytest.raises(SettingsError, match="CHATGLM_WEB_CODE_INTERPRETER='maybe' is not a boolean"):
        parse_settings([], environ={"CHATGLM_WEB_CODE_INTERPRETER": "maybe"})


# -- one declaration: flags, variables, checks and README's table all come from it -------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- options table:", "<!-- end of options table -->"


def test_readme_holds_the_generated_table_of_options():
    """README's table is ``options_table()`` as it is: regenerate with ``python -m chatglm_web.settings --markdown``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(TABLE_START)
    table = text[text.index("\n", start) + 1:text.index(TABLE_END)]
    assert table == options_table(), "README's options table is stale: paste `python -m chatglm_web.settings --markdown`"


def test_every_declared_option_has_its_flag_variable_and_help(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    assert set(OPTIONS) == {f.name for f in fields(Settings)} - {"model_explicit"}
    for name in OPTIONS:
        assert flag_name(name) in text and env_name(name) in text
    for name in SECRET_SETTINGS:
        assert flag_name(name + "_file") in text and env_name(name + "_file") in text
    assert SECRET_SETTINGS == ("auth", "api_key", "backend_api_key")
    assert "--no-engine-process" in text and "--api-key-file" in text
    assert "(1 to 32768, default: 2048)" in text  # the range and default, from the declaration


def test_every_variable_sets_its_option():
    """Each option read from its variable, with a value that differs from its default."""
    samples = {"text": "cuda:1", "int": "3", "flag": None, "choice": "bf16"}
    for name, declared in OPTIONS.items():
        default = getattr(Settings(), name)
        raw = samples[declared.kind] or ("false" if default else "true")
        if name == "auth":
            raw = "u:p"
        value = getattr(parse_settings([], environ={env_name(name): raw}), name)
        assert value != default and value is not None, name


def test_the_login_is_checked_in_one_place_whoever_builds_the_settings():
    with pytest.raises(SettingsError, match="--auth must look like user:password"):
        _ = Settings(auth="nocolon").auth_pair
    assert Settings(auth="a:b:c").auth_pair == ("a", "b:c")
    assert Settings().auth_pair is None


def test_limits_travel_as_one_object_with_the_declared_defaults():
    assert Settings().limits == Limits() == Limits(DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_MAX_NEW_TOKENS)
    assert (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_CONTEXT_LENGTH) == (8, 32, 4096)
    s = parse_settings(["--max-batch-size", "4", "--max-queue", "0", "--max-input-chars", "100"],
                       environ={"CHATGLM_WEB_MAX_INPUT_TOKENS": "512", "CHATGLM_WEB_MAX_NEW_TOKENS": "64"})
    assert s.limits == Limits(max_batch_size=4, max_queue=0, max_new_tokens=64, max_input_tokens=512,
                              max_input_chars=100)
    with pytest.raises(FrozenInstanceError):
        s.limits.max_queue = 1


def test_the_secrets_stay_out_of_the_engine_process_copy():
    s = Settings(api_key="k", auth="a:b", backend_api_key="v", model="m")
    assert s.secret_values() == ["a:b", "k", "v"]
    assert s.without_secrets().secret_values() == [] and s.without_secrets().model == "m"
    assert SECRET_ENV_VARS == ("CHATGLM_WEB_AUTH", "CHATGLM_WEB_API_KEY", "CHATGLM_WEB_BACKEND_API_KEY")
