"""Shared task-loading helper for the task tests."""

from __future__ import annotations

import socket

import tasks


def load_suite_offline(suite: str) -> dict:
    """Every task of `suite`, loaded with the network blocked (a suite that claims to be offline must be)."""
    real_connect = socket.socket.connect

    def refuse(self, *args):
        raise AssertionError(f"{suite} tasks must load offline; tried to connect to {args}")

    socket.socket.connect = refuse
    try:
        return {name: tasks.get(name) for name in tasks.names(suite)}
    finally:
        socket.socket.connect = real_connect
