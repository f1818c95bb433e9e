"""The sandbox's NDOP stand-in: its pure decision functions, and its answers through a real sandbox."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dev.mesh_plugins.ndop_plugin import answer, is_opted_out, settings
from dev.mesh_sandbox import NDOP_MAILBOX
from pipeline.request import datfile
from pipeline.core import nhs
from tests.fixtures.mesh import Mesh


def test_is_opted_out_is_deterministic_and_close_to_the_fraction() -> None:
    numbers = nhs.synthetic_numbers(20_000, seed=3).to_pylist()
    chosen = [n for n in numbers if is_opted_out(n, 0.1, seed=7)]
    assert chosen == [n for n in numbers if is_opted_out(n, 0.1, seed=7)]
    assert 1700 < len(chosen) < 2300
    assert chosen != [n for n in numbers if is_opted_out(n, 0.1, seed=8)]
    assert not any(is_opted_out(n, 0, seed=7) for n in numbers[:100])
    assert all(is_opted_out(n, 1, seed=7) for n in numbers[:100])


def _config(**changes: str) -> dict[str, str]:
    return {**settings({}), **changes}


def test_answer_removes_opted_out_numbers_and_keeps_the_line_ending(tmp_path: Path) -> None:
    numbers = nhs.synthetic_numbers(40, seed=4)
    listed = numbers.to_pylist()[:5]
    (tmp_path / "out.txt").write_text("\n".join(listed) + "\n")
    for ending in ("crlf", "lf"):
        reply = answer(datfile.encode(numbers, ending), _config(opted_out_file=str(tmp_path / "out.txt"),
                                                                opt_out_fraction="0.2", seed="1"))
        expected = [n for n in numbers.to_pylist() if n not in listed and not is_opted_out(n, 0.2, 1)]
        assert datfile.parse(reply).numbers.to_pylist() == expected
        assert (b"\r\n" in reply) == (ending == "crlf")


def test_answer_is_empty_when_everyone_opted_out_and_one_line_for_an_invalid_number() -> None:
    numbers = nhs.synthetic_numbers(5, seed=5)
    assert answer(datfile.encode(numbers), _config(opt_out_fraction="1")) == b""
    bad = datfile.encode(numbers) + b"9990000019,\r\n"
    assert answer(bad, _config()).decode().strip() == datfile.INVALID_NUMBERS_REPLY


def test_settings_read_environment_then_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "plugin.json"
    env = {"NDOP_SANDBOX_SEED": "3", "NDOP_SANDBOX_MODE": "silent", "NDOP_SANDBOX_CONFIG": str(config_file)}
    assert settings(env)["seed"] == "3" and settings(env)["mode"] == "silent"  # file absent: env only
    config_file.write_text(json.dumps({"mode": "notice-only", "opt_out_fraction": 0.5}))
    found = settings(env)
    assert found["mode"] == "notice-only" and found["opt_out_fraction"] == "0.5" and found["seed"] == "3"
    config_file.write_text(json.dumps({"colour": "blue"}))
    with pytest.raises(ValueError, match="unknown NDOP sandbox setting"):
        settings(env)


def test_sandbox_answers_a_request_like_pos(mesh: Mesh) -> None:
    """Through the real sandbox: notice then reply, same local id, seeded opt-outs as computed here."""
    mesh.plugin(opt_out_fraction=0.25, seed=11, reply_workflow_id="SPINE_NTT_UPHOLDING_RESPONSE")
    numbers = nhs.synthetic_numbers(200, seed=6)
    with mesh.client() as ours:
        ours.send_message(NDOP_MAILBOX, datfile.encode(numbers), workflow_id="SPINE_NTT_UPHOLDING",
                          local_id="NDOP-TEST-1", subject="NDOP opt-out check test", filename="T.dat")
    import time

    deadline = time.monotonic() + 10
    while len(mesh.inbox()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with mesh.client() as ours:
        notice, reply = (ours.retrieve_message(m) for m in mesh.inbox())
        assert notice.subject == "SUCCESS" and json.loads(notice.read())["status"] == "pending"
        assert {notice.local_id, reply.local_id} == {"NDOP-TEST-1"}
        assert {notice.sender, reply.sender} == {NDOP_MAILBOX}
        assert reply.workflow_id == "SPINE_NTT_UPHOLDING_RESPONSE"
        got = datfile.parse(reply.read()).numbers.to_pylist()
    assert got == [n for n in numbers.to_pylist() if not is_opted_out(n, 0.25, 11)]
    assert 0 < len(got) < 200
    assert len(mesh.inbox(NDOP_MAILBOX)) == 1  # the request itself, still in NDOP's inbox
