"""`python -m server.audit`: the command line (server/audit/cli.py)."""
import sys

from server.audit.cli import run

sys.exit(run())
