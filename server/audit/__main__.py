"""`python -m server.audit`: the command line (server/audit/cli.py)."""
import sys

from server.audit.cli import main

sys.exit(main())
