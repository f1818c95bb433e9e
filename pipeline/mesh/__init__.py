"""MESH: the transport, the send policy, the inbox poller, and the driver that puts them together
(pipeline/mesh/driver.py)."""
