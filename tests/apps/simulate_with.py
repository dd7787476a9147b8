"""Test-only: `python -m tests.apps.simulate_with MODULE:ATTR [simulate.py arguments]`.

Runs simulate.py unchanged, except that the Flower App it hands to `flwr run` is a copy of
the project whose ClientApp is MODULE:ATTR (a test-only app under tests/apps): the copy's
pyproject.toml names that app and its bundle carries tests/apps.
"""
import re
import shutil
import sys
import tempfile
from pathlib import Path

import server.flower_launch as flower_launch
import simulate

ROOT = Path(__file__).resolve().parent.parent.parent


def _app_with(client_app: str):
    def assemble(flwr_home: Path) -> Path:
        app = Path(tempfile.mkdtemp(prefix="test-app-", dir=flwr_home))
        for name in ("server", "client", "common", "configs", "tests/apps"):
            shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (app / "tests" / "__init__.py").write_text("")
        text = (ROOT / "pyproject.toml").read_text()
        text = re.sub(r'(?m)^clientapp = ".*"$', f'clientapp = "{client_app}"', text)
        text = text.replace('"configs/*.yaml"]', '"configs/*.yaml", "tests/**/*.py"]')
        (app / "pyproject.toml").write_text(text)
        return app
    return assemble


if __name__ == "__main__":
    flower_launch.app_directory = _app_with(sys.argv[1])
    sys.exit(simulate.main(sys.argv[2:]))
