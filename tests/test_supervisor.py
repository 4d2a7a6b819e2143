"""The supervisor of the model host (`longembed up` runs it): restarts a host that dies, not one that
refuses its configuration, and never lingers after a failed start."""

from __future__ import annotations

import os

import pytest

from longembed.plugin.service.supervisor import HostError, HostProcess


def test_a_host_that_refuses_its_configuration_is_not_restarted(tmp_path):
    sock = tmp_path / "host.sock"
    host = HostProcess(tmp_path, sock, tmp_path / "log" / "host.log")
    with pytest.raises(HostError, match="supervisor exited") as caught:
        host.start(
            ["--socket", str(sock), "--port", "0", "--max-wait-ms", "-1"], dict(os.environ), timeout=120
        )
    assert "batching window" in str(caught.value)  # the host's own reason, from its log
    assert host.running_pid() is None
    assert "not restarting" in host.log_file.read_text()
    assert host.stop() is False  # nothing left to stop
