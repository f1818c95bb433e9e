"""MESH settings: sources, precedence, refusals, and secrets kept out of reprs."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.mesh.config import MeshConfig, load_config

BASE = {"MESH_URL": "https://mesh.example.nhs.uk", "MESH_MAILBOX": "x26abc1", "MESH_PASSWORD": "pw-secret",
        "MESH_SHARED_KEY": "key-secret"}


def test_environment_then_file_then_command_line(tmp_path: Path) -> None:
    config_file = tmp_path / "mesh.conf"
    config_file.write_text("# our mailbox\nMESH_MAILBOX = X26ABC2\nexport MESH_PASSWORD='from-file'\n"
                           "NDOP_WORKFLOW_IDS=A, B\nNDOP_RESEND_AFTER_HOURS=2\nNDOP_SEND_CTL=yes\n")
    config_file.chmod(0o600)
    config = load_config(config_file, env=BASE, overrides={"MESH_URL": "http://127.0.0.1:9", "MESH_CA_CERT": None})
    assert config.url == "http://127.0.0.1:9" and config.mailbox == "X26ABC2" and config.password == "from-file"
    assert config.shared_key == "key-secret" and config.workflow_ids == ("A", "B")
    assert config.resend_after == timedelta(hours=2) and config.send_ctl is True
    assert config.ndop_mailbox == "X26HC065" and config.overdue_after == timedelta(days=5)


def test_secrets_never_appear_in_repr() -> None:
    text = repr(load_config(env=BASE))
    assert "pw-secret" not in text and "key-secret" not in text and "X26ABC1" in text


def test_missing_shared_key_is_refused_unless_local() -> None:
    env = {k: v for k, v in BASE.items() if k != "MESH_SHARED_KEY"}
    with pytest.raises(InputError, match="MESH_SHARED_KEY is not set"):
        load_config(env=env)
    with pytest.raises(InputError, match="MESH_SHARED_KEY is not set"):
        load_config(env={**env, "MESH_URL": "live"})
    assert load_config(env={**env, "MESH_URL": "http://127.0.0.1:8700"}).is_local
    assert load_config(env={**env, "MESH_URL": "http://localhost:8700"}).shared_key is None


@pytest.mark.parametrize("url, local", [("int", False), ("live", False), ("http://[::1]:1", True),
                                        ("https://127.0.0.2", True), ("https://msg.intspineservices.nhs.uk", False)])
def test_is_local(url: str, local: bool) -> None:
    assert MeshConfig(url=url).is_local is local


def test_bad_settings_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing: MESH_PASSWORD"):
        load_config(env={k: v for k, v in BASE.items() if k != "MESH_PASSWORD"})
    with pytest.raises(InputError, match="go together"):
        load_config(env={**BASE, "MESH_CLIENT_CERT": str(tmp_path)})
    with pytest.raises(InputError, match="MESH_CA_CERT .*: no such file"):
        load_config(env={**BASE, "MESH_CA_CERT": str(tmp_path / "ca.pem")})
    config_file = tmp_path / "bad.conf"
    config_file.write_text("MESH_URL=x\nMESH_PASWORD=typo\n")
    with pytest.raises(InputError, match=r"bad.conf:2: unknown setting 'MESH_PASWORD'"):
        load_config(config_file, env=BASE)
    config_file.write_text("NDOP_OVERDUE_DAYS=soon\n")
    with pytest.raises(InputError, match="NDOP_OVERDUE_DAYS='soon' is not a number of days"):
        load_config(config_file, env=BASE)
    with pytest.raises(InputError, match="use an http"):
        load_config(env={**BASE, "MESH_URL": "ftp://x"})
