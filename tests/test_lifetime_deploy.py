"""Process lifetime in a deployment (issue 26 item 4): a SuperLink killed -9 whose parent has not
reaped it yet (a zombie, as under a supervisor that does not wait at once) still ends its
ServerApp "interrupted" with exit 130, and its SuperExec with it.

Flower's own parent monitor (`os.kill(pid, 0)`) takes a zombie for alive, so the SuperExec
never leaves; the ServerApp watches the SuperLink itself (server/server_app.py StopFlag).
tests/test_faults_deploy_restart.py covers a reaped SuperLink and the resume after it.
"""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.deploy_helpers import wait_for
from tests.test_faults_deploy_restart import _checkpointed_round, federation  # noqa: F401 - the fixture


@pytest.mark.deploy
def test_deploy_a_superlink_killed_and_not_reaped_ends_the_serverapp_interrupted_and_leaves_nothing(federation):  # noqa: F811
    fed = federation(4, round_timeout=120)
    try:
        fed.start_run(f'run-dir="{fed.run_dir}"', f'config-path="{fed.config}"')
        wait_for(lambda: _checkpointed_round(fed.run_dir) >= 1, 600, 0.5, "round 1 to finish")
        superlink = fed.superlink.popen
        below = psutil.Process(superlink.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in below]
        assert any("flwr-serverapp" in c for c in commands) and any("flower-superexec" in c for c in commands), commands
        os.kill(superlink.pid, signal.SIGKILL)  # and no wait(): it stays a zombie
        # The signal is delivered asynchronously: the process is a zombie a moment later.
        wait_for(lambda: psutil.Process(superlink.pid).status() == psutil.STATUS_ZOMBIE, 30, 0.1,
                 "the killed SuperLink to be a zombie")
        _, alive = psutil.wait_procs(below, timeout=120)
        assert alive == [], [p.cmdline() for p in alive]  # neither the ServerApp nor the SuperExec is left
        status = json.loads((fed.run_dir / "status.json").read_text())
        assert status["state"] == "interrupted" and status["exit_code"] == 130, status
        assert "the SuperLink went away during round" in status["reason"], status
        assert status["rounds_completed"] == _checkpointed_round(fed.run_dir) >= 1, status
        superlink.wait(timeout=30)
    except (AssertionError, OSError) as error:
        raise AssertionError(f"{error}\n{fed.logs()}") from None
