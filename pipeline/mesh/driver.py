"""The MESH driver: send a request to NDOP, poll the inbox for what comes back, acknowledge safely.

A small facade over three parts, each in its own module:

- :mod:`pipeline.mesh.transport`: the typed HTTP conversation (handshake, listing, whole-or-nothing downloads,
  chunked posts that tell a lost first POST from a refused one, acknowledgements);
- :mod:`pipeline.mesh.sender`: when a request is sent, and never twice unless provably lost;
- :mod:`pipeline.mesh.poller`: each inbox message dealt with as :func:`pipeline.mesh.inbox.classify_inbox_message`
  decides; a reply acknowledged only once its Consents are stored.

MESH rules kept here (docs/mesh-conformance.md); the crash and idempotency contract (the ``sending``,
``ctl_sending`` and ``acknowledging`` markers, ``send-unknown``) is stated once, in pipeline/lifecycle/state.py.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Callable

from mesh_client import MeshClient

from pipeline.mesh.poller import PollReport, Poller
from pipeline.mesh.sender import SendResult, Sender
from pipeline.mesh.transport import FaultHook, MeshTransport
from pipeline.mesh.config import MIN_POLL_INTERVAL, MeshConfig
from pipeline.lifecycle.state import ReplyDecision, RequestRecord, WorkDir

__all__ = ["MeshDriver", "PollReport", "SendResult"]


class MeshDriver:
    """One mailbox's conversation with NDOP, recorded in the work dir's ``request.json`` files."""

    def __init__(self, config: MeshConfig, work_dir: WorkDir,
                 client_factory: Callable[[MeshConfig], MeshClient] | None = None,
                 max_chunk_size: int = 75 * 1024 * 1024) -> None:
        self.config = config
        self.work_dir = work_dir
        self.transport = MeshTransport(config, client_factory, max_chunk_size)
        self.sender = Sender(self.transport, work_dir, look_at_inbox=lambda: self.poller.poll_once(PollReport(), set()))
        self.poller = Poller(self.transport, work_dir, settle=self.sender.settle_interrupted_sends)

    def __enter__(self) -> "MeshDriver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    @property
    def client(self) -> MeshClient:
        return self.transport.client

    @property
    def fault_hook(self) -> FaultHook | None:
        return self.transport.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:  # tests only
        self.transport.fault_hook = hook

    def handshake(self) -> None:
        self.transport.handshake()

    def ensure_handshake(self) -> None:
        self.transport.ensure_handshake()

    def send(self, request_id: str | None = None, now: datetime | None = None) -> list[SendResult]:
        return self.sender.send(request_id, now)

    def poll(self, wait: float = 0, interval: float = MIN_POLL_INTERVAL,
             sleep: Callable[[float], None] = time.sleep) -> PollReport:
        return self.poller.poll(wait, interval, sleep)

    def acknowledge(self, request_id: str) -> RequestRecord:
        return self.poller.acknowledge(request_id)

    def resolve_second_reply(self, request_id: str, use: str,
                             message_id: str | None = None) -> tuple[RequestRecord, ReplyDecision]:
        return self.poller.resolve_second_reply(request_id, use, message_id)
