"""MESH: its settings (config.py), the typed transport (transport.py), the send policy (sender.py), the inbox
poller (poller.py) applying the pure classifier (inbox.py), and the driver that puts them together (driver.py)."""
