"""Who may open an association: the calling AE titles, peer addresses and the called AE title.

`AccessPolicy.check` is pure: it answers None (allowed) or the A-ASSOCIATE-RJ to send
(scp.receive.status) with the reason for the log line.

Two sources, and an association must pass both: the [security] allow-lists
(allowed_addresses, allowed_calling_aets) and the [[senders]] table (scp.senders:
an AE title paired with addresses is refused from any other, and with
security.allow_unknown_senders = false an AE title without an entry is refused).
Checked in that order, then the called AE title; the first refusal is the one logged.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from scp.config import NodeConfig, SecurityConfig
from scp.errors import ConfigurationError
from scp.receive.status import REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_NO_REASON
from scp.senders import SenderTable

Refusal = tuple[tuple[int, int, int], str]  # (A-ASSOCIATE-RJ result/source/diagnostic, reason)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association (SecurityConfig's allow-lists)."""

    ae_title: str
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()  # IP addresses or networks ("10.0.0.0/8")
    require_called_aet: bool = True
    # [[senders]]; the empty table allows every AE title (a node without [[senders]] is as before)
    senders: SenderTable = field(default_factory=SenderTable, compare=False)
    _networks: tuple = field(default=(), repr=False, compare=False)

    @classmethod
    def from_config(cls, node: NodeConfig, security: SecurityConfig,
                    senders: SenderTable | None = None) -> "AccessPolicy":
        networks = []
        for entry in security.allowed_addresses:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"security.allowed_addresses: {entry!r} is not an IP address "
                                         f"or network") from exc
        return cls(node.ae_title.strip(), tuple(a.strip() for a in security.allowed_calling_aets),
                   tuple(security.allowed_addresses), security.require_called_aet,
                   SenderTable() if senders is None else senders, tuple(networks))

    def check(self, calling_aet: str, called_aet: str, address: str) -> Refusal | None:
        """None when allowed, else (A-ASSOCIATE-RJ result/source/diagnostic, reason)."""
        if self._networks:
            try:
                peer = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                peer = None
            if peer is None or not any(peer in net for net in self._networks):
                return REJECT_NO_REASON, f"peer address {address} is not in security.allowed_addresses"
        if self.allowed_calling_aets and calling_aet.strip() not in self.allowed_calling_aets:
            return REJECT_CALLING_AE, f"calling AE title {calling_aet.strip()!r} is not in security.allowed_calling_aets"
        refused = self.senders.refusal(calling_aet, address)
        if refused is not None:
            # Both kinds (unpaired address, unknown sender) are a calling AE title this node does not
            # recognize from that peer, so 1/1/3 rather than 1/1/1; the log line says which.
            return REJECT_CALLING_AE, refused.reason
        if self.require_called_aet and called_aet.strip() != self.ae_title:
            return REJECT_CALLED_AE, (f"called AE title {called_aet.strip()!r} is not this node's "
                                      f"({self.ae_title!r}; security.require_called_aet)")
        return None
