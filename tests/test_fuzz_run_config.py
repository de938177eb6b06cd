"""run.toml, the supervisor's configuration, read with hostile eyes: whatever the text, the
parser gives a RunConfig or a ConfigError naming what is wrong, never another exception (a
PID 1 that dies on its configuration boots no app and tells the host nothing).

A seeded property run in the suite: mutants of the example image's run.toml (lines dropped,
duplicated or swapped, values replaced by other TOML values, bytes flipped) and free text."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyutil.enclave.config import ConfigError, RunConfig, parse_config

EXAMPLE = (Path(__file__).parent.parent / "examples" / "enclave" / "run.toml").read_text()
LINES = EXAMPLE.splitlines()
VALUES = ('""', "0", "-1", "1e309", "true", "[]", "{}", '["a", 1]', '"/"', '"relative"',
          '"vsock://x:y"', '"tcp://127.0.0.1:99999"', '"\\u0000"', "[[1]]", "{ a = { b = 1 } }",
          '"' + "x" * 5000 + '"', "1979-05-27T07:32:00Z")


@st.composite
def mutants(draw: st.DrawFn) -> str:
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            del lines[i]
        elif kind == 1:
            lines.insert(i, lines[i])
        elif kind == 2 and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(st.sampled_from(VALUES))}"
        elif kind == 3:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:k] + draw(st.characters()) + lines[i][k + 1 :]
        if not lines:
            break
    return "\n".join(lines)


def check(text: str) -> None:
    try:
        config = parse_config(text, source="run.toml")
    except ConfigError as e:
        assert str(e)  # a message that says what is wrong
        return
    assert isinstance(config, RunConfig)


def test_the_example_parses() -> None:
    assert isinstance(parse_config(EXAMPLE, source="run.toml"), RunConfig)


@settings(max_examples=400, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutants_of_the_example_parse_or_are_a_config_error(text: str) -> None:
    check(text)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.text(max_size=400))
def test_any_text_parses_or_is_a_config_error(text: str) -> None:
    check(text)
