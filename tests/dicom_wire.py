"""The DICOM upper layer by hand (PS3.8), for tests that must send what no library would:
half a PDU, a lying length, a data set cut in the middle, then a dropped connection.

    client = WireClient.connect(port)
    client.associate(calling="RAW", called="FHIRSCP")     # -> "accepted" or ("rejected", result, source, reason)
    status = client.c_store(dataset_bytes, sop_class, sop_uid)
    client.send(p_data(1, [(False, False, half_a_dataset)]))   # anything, then
    client.close()                                         # drop it without A-RELEASE / A-ABORT

Data sets are bytes in the transfer syntax of the one presentation context proposed
(Explicit VR Little Endian unless told otherwise).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.4242"


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(calling: str, called: str, abstract_syntax: str = CT_IMAGE_STORAGE,
                 transfer_syntax: str = EXPLICIT_LE, max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ proposing one presentation context (ID 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    body = (struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user))
    return _pdu(0x01, body)


def p_data(context_id: int, fragments: list[tuple[bool, bool, bytes]]) -> bytes:
    """P-DATA-TF with one PDV per (is_command, is_last, data) fragment."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, context_id, int(command) | int(last) << 1) + data
                    for command, last, data in fragments)
    return _pdu(0x04, body)


def release_rq() -> bytes:
    return _pdu(0x05, bytes(4))


def _element(group: int, elem: int, value: bytes) -> bytes:
    """Implicit VR Little Endian, as every DIMSE command set is encoded."""
    return struct.pack("<HHL", group, elem, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def command_set(command_field: int, message_id: int, sop_class: str, sop_uid: str | None = None) -> bytes:
    """C-STORE-RQ (0x0001) or C-ECHO-RQ (0x0030) command set."""
    elements = _element(0, 0x0002, _uid(sop_class)) + _element(0, 0x0100, struct.pack("<H", command_field))
    elements += _element(0, 0x0110, struct.pack("<H", message_id))
    if command_field == 0x0001:
        elements += _element(0, 0x0700, struct.pack("<H", 0))  # priority: medium
    has_data = 0x0001 if command_field == 0x0001 else 0x0101
    elements += _element(0, 0x0800, struct.pack("<H", has_data))
    if sop_uid is not None:
        elements += _element(0, 0x1000, _uid(sop_uid))
    return _element(0, 0x0000, struct.pack("<L", len(elements))) + elements


def command_status(command: bytes) -> int:
    pos = 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHL", command, pos)
        if (group, elem) == (0, 0x0900):
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    raise AssertionError(f"no Status in the response command set {command!r}")


FRAGMENT = (1 << 20) - 6  # bytes of a data set per P-DATA PDU (its PDV item header takes 6)


@dataclass
class WireClient:
    sock: socket.socket
    message_id: int = 0

    @classmethod
    def connect(cls, port: int, timeout: float = 30) -> "WireClient":
        return cls(socket.create_connection(("127.0.0.1", port), timeout=timeout))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"connection closed by the node after {len(data)} of {count} bytes")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBL", self._read(6))
        return pdu_type, self._read(length)

    def answer(self) -> str:
        """What the node did next: "A-ABORT", "A-ASSOCIATE-RJ", ... (the PDU it sent) or "closed"."""
        names = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x06: "A-RELEASE-RP",
                 0x07: "A-ABORT"}
        try:
            pdu_type, _ = self.read_pdu()
        except (ConnectionError, OSError):
            return "closed"
        return names.get(pdu_type, f"PDU type 0x{pdu_type:02X}")

    def associate(self, calling: str = "RAWSCU", called: str = "FHIRSCP", **kwargs) -> str | tuple[str, int, int, int]:
        self.send(associate_rq(calling, called, **kwargs))
        pdu_type, body = self.read_pdu()
        if pdu_type == 0x02:
            return "accepted"
        if pdu_type == 0x03:
            return ("rejected", body[1], body[2], body[3])
        return (f"PDU type 0x{pdu_type:02X}", 0, 0, 0)

    def c_store(self, dataset: bytes, sop_class: str = CT_IMAGE_STORAGE, sop_uid: str = "1.2.3.4") -> int:
        self.message_id += 1
        self.send(p_data(1, [(True, True, command_set(0x0001, self.message_id, sop_class, sop_uid))]))
        # fragments within the node's default Maximum Length (node.max_pdu, 1 MiB), as a real SCU sends
        size = FRAGMENT
        for start in range(0, max(len(dataset), 1), size):
            self.send(p_data(1, [(False, start + size >= len(dataset), dataset[start:start + size])]))
        return self.response_status()

    def c_echo(self) -> int:
        self.message_id += 1
        self.send(p_data(1, [(True, True, command_set(0x0030, self.message_id, VERIFICATION))]))
        return self.response_status()

    def response_status(self) -> int:
        command = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                raise AssertionError(f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}")
            pos = 0
            while pos < len(body):
                length, _, header = struct.unpack_from(">LBB", body, pos)
                command += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if header & 0b11 == 0b11:  # last fragment of the command set
                    return command_status(command)

    def release(self) -> None:
        self.send(release_rq())
        pdu_type, _ = self.read_pdu()
        assert pdu_type == 0x06, f"expected A-RELEASE-RP, got 0x{pdu_type:02X}"
        self.close()
