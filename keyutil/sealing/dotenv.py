"""A dotenv file (``NAME=value`` lines) parsed into variables, in memory; no value is ever
put in an error message.

    >>> from keyutil.sealing.dotenv import parse_dotenv
    >>> parse_dotenv(b'# db\\nexport DB_USER=app\\nDB_PASS="s3cr\\\\"et" # quoted\\n')
    {'DB_USER': 'app', 'DB_PASS': 's3cr"et'}

The grammar, one variable a line (UTF-8):

- blank lines and lines starting with ``#`` are skipped; ``export `` before a name is allowed;
- a name is ``[A-Za-z_][A-Za-z0-9_]*``, followed by ``=`` (no spaces around it);
- an unquoted value runs to the end of the line, surrounding blanks removed, and ends at
  `` #`` (a comment); it may not contain a quote character;
- ``'...'`` is taken literally; ``"..."`` knows the escapes ``\\\\ \\" \\n \\r \\t``; after
  the closing quote only blanks and a comment may follow; quoted values stay on one line;
- a name given twice, a NUL, or anything else is refused with the line number only
  (:class:`DotenvError`), never the line's content: it may hold a secret.
"""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DOTENV = 1 << 20
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


class DotenvError(ValueError):
    """A malformed dotenv file; ``line`` is 1-based, ``reason`` names no value."""

    code = "dotenv_invalid"

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"dotenv line {line}: {reason}")
        self.line = line
        self.reason = reason
        self.message = str(self)


def _rest_is_comment(rest: str) -> bool:
    rest = rest.strip(" \t")
    return not rest or rest.startswith("#")


def _quoted(text: str, number: int) -> tuple[str, str]:
    """(value, what follows the closing quote) of ``text`` starting with a quote."""
    quote = text[0]
    if quote == "'":
        end = text.find("'", 1)
        if end < 0:
            raise DotenvError(number, "a single-quoted value is not closed on its line")
        return text[1:end], text[end + 1 :]
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), text[i + 1 :]
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _ESCAPES:
                raise DotenvError(number, r"unknown escape in a double-quoted value")
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    raise DotenvError(number, "a double-quoted value is not closed on its line")


def parse_dotenv(data: bytes | bytearray) -> dict[str, str]:
    """The variables of a dotenv file, in file order; DotenvError with a line number."""
    if len(data) > MAX_DOTENV:
        raise DotenvError(0, f"the file exceeds {MAX_DOTENV} bytes")
    variables: dict[str, str] = {}
    for number, raw in enumerate(bytes(data).split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DotenvError(number, "not UTF-8") from None
        if "\0" in line:
            raise DotenvError(number, "a NUL byte")
        text = line.strip(" \t")
        if not text or text.startswith("#"):
            continue
        if text.startswith("export ") or text.startswith("export\t"):
            text = text[len("export") :].lstrip(" \t")
        match = NAME.match(text)
        if match is None:
            raise DotenvError(number, "expected NAME=value with NAME of [A-Za-z_][A-Za-z0-9_]*")
        name, rest = match.group(), text[match.end() :]
        if not rest.startswith("="):
            # Not even the name: on a line without '=' it may run into the value.
            raise DotenvError(number, "expected '=' right after the name")
        value = rest[1:]
        if value.startswith(("'", '"')):
            value, after = _quoted(value, number)
            if not _rest_is_comment(after):
                raise DotenvError(number, "unexpected text after a quoted value")
        else:
            cut = re.search(r"[ \t]#", value)
            if cut is not None:
                value = value[: cut.start()]
            value = value.strip(" \t")
            if "'" in value or '"' in value:
                raise DotenvError(number, "a quote inside an unquoted value")
        if name in variables:
            raise DotenvError(number, "a name set on an earlier line again")
        variables[name] = value
    return variables
