"""The `hospital-fl` command: one entry point for the project's three tools.

    hospital-fl simulate [--config PATH] [--set KEY=VALUE ...] [--out DIR]   # = python simulate.py
    hospital-fl audit RUN_DIR [--json] [--plot FILE]                         # = python -m server.audit
    hospital-fl certs --out certs --host NAME                                # = python -m server.certs

Each subcommand hands its arguments unchanged to the module that owns it, so the forms above
behave identically and `hospital-fl <subcommand> --help` is that module's own help.
"""
from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "simulate": ("server.simulation", "simulate N hospitals on this machine (Flower's local simulation)"),
    "audit": ("server.audit", "recompute every epsilon of a run's privacy ledger"),
    "certs": ("server.certs", "make TLS certificates (coordinator) or a SuperNode key (hospital)"),
}


def usage() -> str:
    lines = ["usage: hospital-fl {simulate,audit,certs} [ARGS ...]", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`hospital-fl <command> --help` shows the command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: choose simulate, audit or certs (hospital-fl --help)", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    saved = sys.argv
    sys.argv = [f"hospital-fl {name}", *rest]
    try:
        # Run the module as `python -m` would, so its own argument parsing and exit codes apply.
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


if __name__ == "__main__":
    sys.exit(main())
