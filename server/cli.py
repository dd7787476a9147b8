"""The `hospital-fl` command: one entry point for the project's three tools.

    hospital-fl simulate [--config PATH] [--set KEY=VALUE ...] [--out DIR]   # = python simulate.py
    hospital-fl audit RUN_DIR [--json] [--plot FILE]                         # = python -m server.audit
    hospital-fl certs --out certs --host NAME                                # = python -m server.certs
    hospital-fl --version

Each subcommand hands its arguments unchanged to the module that owns it, so the forms above
behave identically and `hospital-fl <subcommand> --help` is that module's own help, under the
name it was called by (`usage: hospital-fl audit ...`, not `python -m server.audit`).

`command("audit", run_dir)` is the hint to print for a follow-up command: it is the form that
works in the environment the run was started from (`uv run hospital-fl ...` under uv, plain
`hospital-fl ...` where the installed command is on PATH, the script's full path otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import shlex
import shutil
import sys
from pathlib import Path

PROG = "hospital-fl"
COMMANDS = {
    "simulate": ("server.simulation", "simulate N hospitals on this machine (Flower's local simulation)"),
    "audit": ("server.audit", "recompute every epsilon of a run's privacy ledger and check the run's files"),
    "certs": ("server.certs", "make TLS certificates (coordinator) or a SuperNode key (hospital)"),
}


def version_text() -> str:
    """`hospital-fl 0.1.0 (flwr 1.42.0, tensorflow 2.21.0, tf-keras 2.21.0, dp-accounting 0.6.0)`."""
    from server.provenance import versions

    found = versions()
    libraries = ", ".join(f"{name} {found[name]}" for name in ("flwr", "tensorflow", "tf-keras", "dp-accounting")
                          if found.get(name))
    return f"{PROG} {found.get('hospital-fl') or 'unknown version'}" + (f" ({libraries})" if libraries else "")


class _Version(argparse.Action):
    """--version: one unwrapped line (argparse's own version action wraps it at the terminal width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def parser() -> argparse.ArgumentParser:
    """The top-level parser: its help lists the subcommands; each subcommand parses its own options."""
    top = argparse.ArgumentParser(
        prog=PROG, description="Federated learning across hospitals with DP-SGD and an auditable privacy ledger.",
        epilog=f"`{PROG} <command> --help` shows the command's own options.")
    top.add_argument("--version", action=_Version, nargs=0, help="show the versions and exit")
    commands = top.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return top


def usage() -> str:
    return parser().format_help()


@contextlib.contextmanager
def _named(name: str, module: str):
    """While a subcommand runs, argparse parsers it builds call themselves `hospital-fl <name>`.

    The modules also run on their own (`python -m server.audit`) and name themselves so in
    `prog=`, descriptions and epilogs; under this command those words would be wrong."""
    spelled = f"python -m {module}"
    original = argparse.ArgumentParser.__init__

    def rename(value):
        return value.replace(spelled, f"{PROG} {name}") if isinstance(value, str) else value

    def init(self, *args, **kwargs):
        if args:
            args = (rename(args[0]), *args[1:])
        elif kwargs.get("prog") is None:  # argparse would take runpy's sys.argv[0], the module's file name
            kwargs["prog"] = f"{PROG} {name}"
        for key in ("prog", "usage", "description", "epilog"):
            if key in kwargs:
                kwargs[key] = rename(kwargs[key])
        original(self, *args, **kwargs)

    argparse.ArgumentParser.__init__ = init
    try:
        yield
    finally:
        argparse.ArgumentParser.__init__ = original


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and not argv[0].startswith("-"):
            print(f"{PROG}: error: unknown command {argv[0]!r}: choose simulate, audit or certs ({PROG} --help)",
                  file=sys.stderr)
            return 2
        try:
            parser().parse_args(argv)  # --help, --version, or a bad option: argparse answers and exits
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 0
        print(usage(), file=sys.stderr)  # no command given
        return 2
    name, rest = argv[0], argv[1:]
    module = COMMANDS[name][0]
    saved = sys.argv
    sys.argv = [f"{PROG} {name}", *rest]
    try:
        # Run the module as `python -m` would, so its own argument parsing and exit codes apply.
        with _named(name, module):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def command(name: str, *args: str, environ: dict | None = None, executable: str | None = None) -> str:
    """The shell command that runs `hospital-fl <name> <args>` from where this process was started.

    Under `uv run` (uv sets UV_RUN_RECURSION_DEPTH or UV): `uv run hospital-fl ...`, which
    finds the project's environment without activating it. Otherwise the `hospital-fl` beside
    this Python (an installed venv): bare if PATH finds that same one, else by its full path
    (`venv/bin/hospital-fl` works without activating). Without an installed script:
    `python -m server.cli` with this interpreter."""
    environ = os.environ if environ is None else environ
    executable = executable or sys.executable
    tail = " ".join(shlex.quote(str(a)) for a in (name, *args))
    if environ.get("UV_RUN_RECURSION_DEPTH") or environ.get("UV"):
        return f"uv run {PROG} {tail}"
    script = Path(executable).parent / PROG
    if script.is_file():
        found = shutil.which(PROG, path=environ.get("PATH", ""))
        if found and os.path.samefile(found, script):
            return f"{PROG} {tail}"
        return f"{shlex.quote(str(script))} {tail}"
    return f"{shlex.quote(executable)} -m server.cli {tail}"


if __name__ == "__main__":
    sys.exit(main())
