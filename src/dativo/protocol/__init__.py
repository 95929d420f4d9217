"""The wire protocol between the supervisor and a plugin: framing, messages, IPC checks."""

from dativo.protocol._ipc import IpcFormatError, MessageInfo, inspect_message
from dativo.protocol.v1 import PROTOCOL_VERSION, Channel, PeerClosed

__all__ = [
    "PROTOCOL_VERSION",
    "Channel",
    "IpcFormatError",
    "MessageInfo",
    "PeerClosed",
    "inspect_message",
]
