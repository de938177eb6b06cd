"""What the three command lines (keyutil, mock-kms, kms-gov) share: environment variables,
Ctrl-C and the last line of defence against tracebacks.

    >>> import click
    >>> @click.group()
    ... @click.option("--name")
    ... def demo(name: str | None) -> None: ...
    >>> sorted(option_envvars(demo, "DEMO"))
    ['DEMO_NAME']

Every option is also an environment variable, ``PREFIX_<COMMAND>_<OPTION>`` unless it names
its own: it is set on the option itself (so ``--help`` shows it, and it follows the option's
name, not the Python parameter's), and a variable with the prefix that no option reads gets
a warning, with the nearest real name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug; the message names the exception


def _commands(
    command: click.Command, prefix: str, path: str = ""
) -> Iterable[tuple[click.Command, str, str]]:
    yield command, prefix, path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            sub_prefix = f"{prefix}_{name.upper().replace('-', '_')}"
            yield from _commands(sub, sub_prefix, f"{path} {name}".strip())


def option_envvars(cli: click.Command, prefix: str) -> dict[str, tuple[str, list[str]]]:
    """Give every option of ``cli`` and its subcommands its environment variable, shown in
    ``--help``; returns variable -> (option, the commands that have it)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for command, command_prefix, path in _commands(cli, prefix):
        for param in command.params:
            if not isinstance(param, click.Option) or not param.expose_value:
                continue  # --version, --help: nothing to set
            long = max(param.opts, key=len)
            if param.envvar is None:
                param.envvar = f"{command_prefix}_{long.lstrip('-').upper().replace('-', '_')}"
            # kms-gov writes "[env NAME]" into its help texts itself: do not say it twice.
            param.show_envvar = "[env " not in (param.help or "")
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            for name in names:
                found.setdefault(name, (long, []))[1].append(path or "(all)")
    return found


def warn_unknown_envvars(
    prog: str, prefix: str, known: Iterable[str], environ: Mapping[str, str]
) -> list[str]:
    """Warn on stderr about each ``PREFIX_*`` variable that nothing reads; returns them."""
    known = set(known)
    unknown = sorted(n for n in environ if n.startswith(prefix + "_") and n not in known)
    if unknown:
        import difflib  # only when there is something to say: keyutil starts at every boot
    for name in unknown:
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {near[0]}?)" if near else ""
        click.echo(
            f"{prog}: warning: {name} is not a {prog} variable and is ignored{hint}", err=True
        )
    return unknown


def run(
    cli: click.Command,
    argv: Sequence[str] | None,
    *,
    prog_name: str,
    prefix: str,
    other_envvars: Iterable[str] = (),
) -> int:
    """Run ``cli`` and return its exit code: never a traceback, Ctrl-C exits 130."""
    known = option_envvars(cli, prefix).keys() | set(other_envvars)
    warn_unknown_envvars(prog_name, prefix, known, os.environ)
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name=prog_name,
            auto_envvar_prefix=prefix,
            standalone_mode=False,
        )
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): said, as Python would say it
            click.echo(e.code, err=True)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt) as e:
        if isinstance(e, click.Abort) and not isinstance(e.__context__, KeyboardInterrupt):
            click.echo(f"{prog_name}: aborted", err=True)
            return 1
        click.echo(f"\n{prog_name}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (| head): nothing more to say, nowhere to say it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as e:  # the last line of defence: a bug, told in one line
        click.echo(
            f"{prog_name}: internal error: {type(e).__name__}: {str(e)[:200]} (please report it)",
            err=True,
        )
        return EXIT_INTERNAL
    return result if isinstance(result, int) else 0


def version_option(prog_name: str) -> Callable[[F], F]:
    """``--version``: the installed distribution's version (looked up only when asked)."""
    return click.version_option(
        package_name="nitro-keyrelease", prog_name=prog_name, message="%(prog)s %(version)s"
    )
