"""Who sent a study, and what follows from it: the [[senders]] table.

A node fed by several sites must not turn two sites' patient 12345 into one FHIR
Patient. Each [[senders]] entry (scp.config.SenderConfig) names a calling AE title,
optionally paired with the addresses it may connect from, and the settings its studies
are mapped and delivered with; what an entry leaves unset is the global setting.

Used on both sides of the spool, so it lives with what every layer shares:

- at the association (scp.receive): `SenderTable.refusal` — an AE title whose entries all
  name other addresses is refused, and with security.allow_unknown_senders = false so is
  an AE title without an entry;
- at delivery (scp.pipeline): each spooled instance carries the calling AE title and peer
  address it arrived with (`Sender`); `options_for` gives the study's mapping options and
  raises `SenderConflict` when its instances came from senders whose identity settings
  differ (the study is then held back, never mapped under one of them); `destinations_for`
  names where the study goes.

Pure: no sockets, files or clocks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mapping.options import MappingOptions
from scp.config import Config, SenderConfig
from scp.errors import DicomFhirError

# The settings that decide whose patient an instance is: instances of one study whose senders
# differ in one of these are never mapped together.
IDENTITY_SETTINGS = ("patient_identifier_system", "use_issuer_of_patient_id", "issuer_systems", "accession_system")


class SenderConflict(DicomFhirError):
    """A study's instances came from senders whose identity settings differ."""


@dataclass(frozen=True)
class Sender:
    """Where an instance came from, as recorded with it in the spool."""

    ae_title: str
    address: str = ""  # the peer's IP address; "" when unknown (a spool file of an older version)

    def __str__(self) -> str:
        return f"{self.ae_title} at {self.address}" if self.address else self.ae_title


@dataclass(frozen=True)
class Refusal:
    kind: str  # "unpaired address" | "unknown sender"
    reason: str  # for the log line (no patient data)


class SenderTable:
    def __init__(self, senders: Sequence[SenderConfig] = (), base: MappingOptions = MappingOptions(), *,
                 allow_unknown: bool = True, destinations: Sequence[str] = ()) -> None:
        self.senders = tuple(senders)
        self.base = base
        self.allow_unknown = allow_unknown
        self.all_destinations = tuple(destinations)
        self._networks = [tuple(ipaddress.ip_network(a.strip(), strict=False) for a in s.addresses)
                          for s in self.senders]

    @classmethod
    def from_config(cls, config: Config) -> "SenderTable":
        return cls(config.senders, config.mapping, allow_unknown=config.security.allow_unknown_senders,
                   destinations=config.destination_names())

    def match(self, ae_title: str, address: str = "") -> SenderConfig | None:
        """The first entry for this AE title whose addresses include address (or that names none)."""
        ae_title = ae_title.strip()
        peer = _ip(address)
        for sender, networks in zip(self.senders, self._networks):
            if sender.ae_title != ae_title:
                continue
            if not networks or (peer is not None and any(peer in net for net in networks)):
                return sender
        return None

    def refusal(self, ae_title: str, address: str) -> Refusal | None:
        """None when this AE title may connect from address."""
        if self.match(ae_title, address) is not None:
            return None
        listed = [s for s in self.senders if s.ae_title == ae_title.strip()]
        if listed:
            paired = ", ".join(a for s in listed for a in s.addresses)
            return Refusal("unpaired address", f"calling AE title {ae_title.strip()!r} is paired with "
                                               f"{paired} in [[senders]], not with {address}")
        if not self.allow_unknown:
            return Refusal("unknown sender", f"calling AE title {ae_title.strip()!r} has no [[senders]] entry "
                                             f"(security.allow_unknown_senders = false)")
        return None

    def options(self, sender: SenderConfig | None) -> MappingOptions:
        """The mapping options of one sender's studies (the global ones where it sets nothing)."""
        return self.base if sender is None else replace(self.base, **sender.mapping_overrides())

    def options_for(self, senders: Iterable[Sender]) -> MappingOptions:
        """The options of a study whose instances came from senders; SenderConflict when their identity
        settings differ. Other settings (time zone, DICOMweb URL) come from the first sender given."""
        chosen: list[tuple[Sender, MappingOptions]] = []
        for sender in senders:
            options = self.options(self.match(sender.ae_title, sender.address))
            if chosen and _identity(options) != _identity(chosen[0][1]):
                raise SenderConflict(f"the study's instances came from {chosen[0][0]} and {sender}, whose "
                                     f"patient identity settings differ ([[senders]]: "
                                     f"{', '.join(_differing(options, chosen[0][1]))}); not mapped under either")
            chosen.append((sender, options))
        return chosen[0][1] if chosen else self.base

    def destinations_for(self, senders: Iterable[Sender]) -> tuple[str, ...]:
        """Where a study goes: the union of its senders' destinations (a sender naming none: every one)."""
        names: dict[str, None] = {}
        for sender in senders:
            entry = self.match(sender.ae_title, sender.address)
            chosen = self.all_destinations if entry is None or entry.destinations is None else entry.destinations
            names.update(dict.fromkeys(chosen))
        return tuple(names) if names else self.all_destinations


def _ip(address: str) -> Any:
    try:
        return ipaddress.ip_address(address.split("%")[0]) if address else None
    except ValueError:
        return None


def _identity(options: MappingOptions) -> list[Any]:
    return [getattr(options, name) for name in IDENTITY_SETTINGS]


def _differing(a: MappingOptions, b: MappingOptions) -> list[str]:
    return [name for name in IDENTITY_SETTINGS if getattr(a, name) != getattr(b, name)]
