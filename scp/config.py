"""Node configuration: dataclasses, loaded from TOML, validated at start-up.

Every key is documented in config/dicom-fhir-scp.toml. Precedence: command-line
flag > environment variable > file > default. Every key ``<section>.<key>`` may be set
as ``DICOM_FHIR_SCP_<SECTION>_<KEY>`` (upper case), parsed by the field's type
(see `environment_overrides`), and ``DICOM_FHIR_SCP_CONFIG`` names the file. Secrets
may also come from a variable named in the file: each secret key ``x`` has a companion
``x_env`` naming a variable to read instead.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from mapping.errors import ConfigurationError
from mapping.options import FHIR_VERSIONS, SHAPES, MappingOptions

AUTH_MODES = ("none", "bearer", "basic", "oauth2")
LOG_FORMATS = ("text", "json")  # scp.logs.FORMATS; kept here so the config needs no logging import


WORKER_SOCKETS = ("reuseport", "handover")


def default_workers() -> int:
    """node.workers' default: the CPUs this process may run on (its affinity, as a container's
    cpuset limits it; a CPU quota is not seen: set node.workers there)."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 64))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, 64))


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "FHIRSCP"
    port: int = 11112
    bind: str = ""  # "" = every interface, as dcmtk storescp
    spool_dir: Path = Path("./spool")
    output_dir: Path | None = Path("./fhir-output")  # None disables the disk sink
    dead_letter_dir: Path = Path("./dead-letter")
    archive_dir: Path | None = None  # keeps full instances (pixel data included) when set
    idle_timeout: float = 30.0
    accept_unknown_sop_classes: bool = False
    shape: str = "bundle"
    max_pdu: int = 2**20  # a PDU is held whole in memory: 0 (unlimited) lets a sender send its instance as one
    journal_max_bytes: int = 10 * 1024 * 1024  # deliveries.jsonl is rotated to deliveries.jsonl.1 beyond this
    delivery_workers: int = 4  # studies delivered at once (a slow destination holds up only its own)
    # Receive processes sharing the port (scp.receive.pool); 1 = the node's own process receives.
    workers: int = field(default_factory=lambda: default_workers())
    worker_sockets: str = "reuseport"  # how they share it: "reuseport" (SO_REUSEPORT) or "handover"
    max_header_bytes: int = 16 * 2**20  # largest header (before pixel data, inflated) of an instance; 0xC000 beyond
    # Connection limits and timeouts (scp.receive.limits), seconds unless said otherwise.
    max_associations: int = 64  # associations at once, from every peer together
    max_associations_per_peer: int = 8  # associations at once from one IP address
    request_timeout: float = 10.0  # a connection must complete its A-ASSOCIATE-RQ within this
    acse_timeout: float = 30.0  # waiting for an A-RELEASE or A-ABORT exchange to complete
    dimse_timeout: float = 60.0  # waiting for the next DIMSE message part
    network_timeout: float = 60.0  # no byte for this long in the middle of a PDU (or idle): aborted
    tls_handshake_timeout: float = 10.0  # the DICOM TLS handshake
    stop_grace: float = 10.0  # on SIGTERM, the instance in flight may finish within this

    def __post_init__(self) -> None:
        _check(0 < len(self.ae_title.strip()) <= 16, "node.ae_title", "1 to 16 characters", self.ae_title)
        _check(0 <= self.port <= 65535, "node.port", "a port number 0-65535", self.port)
        _check(self.idle_timeout > 0, "node.idle_timeout", "a positive number of seconds", self.idle_timeout)
        _check(self.shape in SHAPES, "node.shape", f"one of {SHAPES}", self.shape)
        _check(self.max_pdu >= 0, "node.max_pdu", "0 or a positive size", self.max_pdu)
        _check(1 <= self.workers <= 64, "node.workers", "a number of processes from 1 to 64", self.workers)
        _check(self.worker_sockets in WORKER_SOCKETS, "node.worker_sockets", f"one of {WORKER_SOCKETS}",
               self.worker_sockets)
        _check(1 <= self.delivery_workers <= 64, "node.delivery_workers", "a number of threads from 1 to 64",
               self.delivery_workers)
        _check(self.journal_max_bytes >= 4096, "node.journal_max_bytes", "at least 4096 bytes",
               self.journal_max_bytes)
        _check(self.max_header_bytes >= 65536, "node.max_header_bytes", "at least 65536 bytes",
               self.max_header_bytes)
        _check(self.max_associations >= 1, "node.max_associations", "at least 1", self.max_associations)
        _check(1 <= self.max_associations_per_peer <= self.max_associations, "node.max_associations_per_peer",
               f"1 to node.max_associations ({self.max_associations})", self.max_associations_per_peer)
        for name in ("request_timeout", "acse_timeout", "dimse_timeout", "network_timeout",
                     "tls_handshake_timeout"):
            _check(getattr(self, name) > 0, f"node.{name}", "a positive number of seconds", getattr(self, name))
        _check(self.stop_grace >= 0, "node.stop_grace", "0 or a positive number of seconds", self.stop_grace)


SECRETS = frozenset({"token", "password", "client_secret"})  # never in a repr (logs, tracebacks)


def _repr_hiding_secrets(config: Any) -> str:
    parts = ", ".join(f"{f.name}={'***' if f.name in SECRETS and getattr(config, f.name) else getattr(config, f.name)!r}"
                      for f in fields(config))
    return f"{type(config).__name__}({parts})"


@dataclass(frozen=True)
class FhirConfig:
    url: str | None = None  # None disables the FHIR sink
    auth: str = "none"
    token: str | None = None  # bearer
    username: str | None = None  # basic
    password: str | None = None
    token_url: str | None = None  # oauth2 client credentials
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    timeout: float = 30.0
    max_backoff: float = 300.0  # cap of the exponential retry delay, seconds
    # The FHIR release written (mapping) and expected of every server (/metadata): one per node.
    version: str = "R4"
    request_deadline: float = 120.0  # seconds one whole request may take (timeout is per read)
    max_response_bytes: int = 64 * 2**20  # a larger answer is a retryable error, never read whole

    def __post_init__(self) -> None:
        _check(self.auth in AUTH_MODES, "fhir.auth", f"one of {AUTH_MODES}", self.auth)
        _check(self.version in FHIR_VERSIONS, "fhir.version", f"one of {FHIR_VERSIONS}", self.version)
        if self.url is not None:
            _check(self.url.startswith(("http://", "https://")), "fhir.url", "an http(s) URL", self.url)
        required = {"bearer": ("token",), "basic": ("username", "password"),
                    "oauth2": ("token_url", "client_id", "client_secret")}.get(self.auth, ())
        for name in required:
            if self.url is not None and not getattr(self, name):
                raise ConfigurationError(
                    f"fhir.{name}: required when fhir.auth = {self.auth!r} "
                    f"(set it, or fhir.{name}_env naming an environment variable)")
        _check(self.timeout > 0, "fhir.timeout", "a positive number of seconds", self.timeout)
        _check(self.max_backoff > 0, "fhir.max_backoff", "a positive number of seconds", self.max_backoff)
        _check(self.request_deadline > 0, "fhir.request_deadline", "a positive number of seconds",
               self.request_deadline)
        _check(self.max_response_bytes >= 1024, "fhir.max_response_bytes", "a size of at least 1024 bytes",
               self.max_response_bytes)

    def __repr__(self) -> str:  # never print secrets
        return _repr_hiding_secrets(self)


@dataclass(frozen=True)
class SecurityConfig:
    allowed_calling_aets: tuple[str, ...] = ()  # empty = any calling AE
    allowed_addresses: tuple[str, ...] = ()  # empty = any peer address
    require_called_aet: bool = True  # reject associations not addressed to node.ae_title
    tls_cert: Path | None = None  # DICOM TLS on when cert and key are set
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_verify_peer: bool = False
    allow_unknown_senders: bool = True  # false: only AE titles with a [[senders]] entry may connect

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError("security.tls_cert and security.tls_key: set both or neither")
        if self.tls_verify_peer and self.tls_ca is None:
            raise ConfigurationError("security.tls_ca: required when security.tls_verify_peer = true")


@dataclass(frozen=True)
class OperationsConfig:
    http_enabled: bool = False  # /healthz and /metrics
    http_bind: str = "127.0.0.1"
    http_port: int = 8081
    min_free_bytes: int = 100 * 2**20  # /readyz fails when the spool's file system has less free
    ready_window: float = 3600.0  # /readyz: a FHIR server that took a delivery this recently counts as up

    def __post_init__(self) -> None:
        _check(0 <= self.http_port <= 65535, "operations.http_port", "a port number 0-65535", self.http_port)
        _check(self.min_free_bytes >= 0, "operations.min_free_bytes", "a number of bytes >= 0",
               self.min_free_bytes)
        _check(self.ready_window >= 0, "operations.ready_window", "a number of seconds >= 0", self.ready_window)


HOOK_PLACEHOLDERS = ("study_uid", "output", "instances", "series", "fhir")


@dataclass(frozen=True)
class HooksConfig:
    on_delivered: tuple[str, ...] | None = None  # argv (no shell); None = no hook
    timeout: float = 60.0  # seconds, then the hook is killed
    max_pending: int = 100  # hooks waiting to run; beyond that a study's hook is dropped (logged)

    def __post_init__(self) -> None:
        if self.on_delivered is not None:
            check_hook_argv(self.on_delivered, "hooks.on_delivered")
        _check(self.timeout > 0, "hooks.timeout", "a positive number of seconds", self.timeout)
        _check(self.max_pending > 0, "hooks.max_pending", "a positive number", self.max_pending)


def check_hook_argv(argv: tuple[str, ...], where: str) -> None:
    """The hook's argv as written: a program given by absolute path, then arguments whose only
    {placeholders} are HOOK_PLACEHOLDERS. (Whether the program exists and is executable is
    checked where the hook is set up to run, scp.pipeline.hooks: `status` reads this file too,
    possibly on another machine.)"""
    if not argv or not argv[0]:
        raise ConfigurationError(f"{where}: expected [\"/absolute/path/to/program\", \"{{study_uid}}\", ...], "
                                 f"got {list(argv)!r} (leave the key out for no hook)")
    if not os.path.isabs(argv[0]):
        # No PATH lookup: what runs must not depend on the service's environment.
        raise ConfigurationError(f"{where}: the program must be an absolute path, got {argv[0]!r}")
    if _placeholders(argv[0], where):
        raise ConfigurationError(f"{where}: the program {argv[0]!r} cannot contain a placeholder")
    for arg in argv[1:]:
        unknown = _placeholders(arg, where) - set(HOOK_PLACEHOLDERS)
        if unknown:
            raise ConfigurationError(f"{where}: unknown placeholder(s) {sorted(unknown)} in {arg!r}; "
                                     f"known: {', '.join('{' + p + '}' for p in HOOK_PLACEHOLDERS)}")


def _placeholders(arg: str, where: str) -> set[str]:
    """The {names} in one argument ("{{" is a literal brace); no format specs or conversions."""
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {arg!r}: {exc} (write {{{{ and }}}} for literal braces)") from exc
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise ConfigurationError(f"{where}: {arg!r}: placeholders take no format spec or conversion")
        names.add(name)
    return names


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"  # "json": one JSON object per line (--log-format)

    def __post_init__(self) -> None:
        _check(self.format in LOG_FORMATS, "logging.format", f"one of {LOG_FORMATS}", self.format)


@dataclass(frozen=True)
class SenderConfig:
    """One [[senders]] entry: who (calling AE title, optionally from which addresses) and its settings.

    A setting left unset (None) is the global one ([mapping], every destination). Matched by
    scp.senders.SenderTable; an entry with addresses matches its AE title only from those.
    """

    ae_title: str
    addresses: tuple[str, ...] = ()  # IP addresses or networks; empty = from anywhere
    patient_identifier_system: str | None = None
    use_issuer_of_patient_id: bool | None = None
    issuer_systems: Mapping[str, str] | None = None  # IssuerOfPatientID -> system URI
    accession_system: str | None = None
    timezone: str | None = None
    dicomweb_url: str | None = None
    destinations: tuple[str, ...] | None = None  # "disk", "fhir" (the [fhir] url) or [fhir.destinations] names

    def __post_init__(self) -> None:
        _check(0 < len(self.ae_title.strip()) <= 16, "senders.ae_title", "1 to 16 characters", self.ae_title)
        object.__setattr__(self, "ae_title", self.ae_title.strip())
        for entry in self.addresses:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ConfigurationError(f"senders ({self.ae_title}).addresses: {entry!r} is not an IP address "
                                         f"or network") from None

    def mapping_overrides(self) -> dict[str, Any]:
        """The [mapping] settings this sender sets (for MappingOptions)."""
        names = ("patient_identifier_system", "use_issuer_of_patient_id", "issuer_systems", "accession_system",
                 "timezone", "dicomweb_url")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


ON_DELETE = ("entered-in-error", "delete", "keep")  # sync.on_delete


@dataclass(frozen=True)
class SyncConfig:
    """[sync]: `dicom-fhir-scp sync` from a DICOMweb server (scp.sources.dicomweb)."""

    dicomweb_url: str | None = None  # QIDO-RS / WADO-RS root, e.g. http://pacs:8042/dicom-web
    auth: str = "none"  # as [fhir]: none, bearer, basic, oauth2 (client credentials)
    token: str | None = None
    username: str | None = None
    password: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    timeout: float = 60.0  # seconds per request, the whole reply included
    max_response_bytes: int = 512 * 2**20  # a reply larger than this is an error, not a memory blow-up
    since: str | None = None  # first StudyDate of the backfill (YYYYMMDD or YYYY-MM-DD); None: 19000101
    until: str | None = None  # last StudyDate; None: today
    window_days: int = 30  # QIDO-RS date window; a window that reaches page_size is split
    page_size: int = 1000  # QIDO-RS limit per request
    rate_limit: float = 0.0  # requests per second to the DICOMweb server, 0 = unlimited
    parallel: int = 4  # studies fetched and delivered at once
    retries: int = 5  # attempts per request when the server is down or answers 5xx/429
    max_backoff: float = 60.0  # cap of the delay between those attempts, seconds
    follow: bool = False  # after the backfill keep running and pick up new, changed and deleted studies
    orthanc_url: str | None = None  # Orthanc's REST root: follow its /changes feed instead of polling
    poll_interval: float = 60.0  # seconds between two polls (or /changes reads)
    recent_days: int = 2  # polling re-queries StudyDate windows of this many days back from today
    stable_age: float = 30.0  # polling: a changed study is delivered after this many seconds unchanged
    on_delete: str = "entered-in-error"  # a study deleted on the source: entered-in-error, delete or keep

    def __post_init__(self) -> None:
        _check(self.auth in AUTH_MODES, "sync.auth", f"one of {AUTH_MODES}", self.auth)
        for name in ("dicomweb_url", "orthanc_url"):
            url = getattr(self, name)
            if url is not None:
                _check(url.startswith(("http://", "https://")), f"sync.{name}", "an http(s) URL", url)
        required = {"bearer": ("token",), "basic": ("username", "password"),
                    "oauth2": ("token_url", "client_id", "client_secret")}.get(self.auth, ())
        for name in required:
            if self.dicomweb_url is not None and not getattr(self, name):
                raise ConfigurationError(f"sync.{name}: required when sync.auth = {self.auth!r} "
                                         f"(set it, or sync.{name}_env naming an environment variable)")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                _check(re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", value) is not None, f"sync.{name}",
                       "a date YYYYMMDD or YYYY-MM-DD", value)
        _check(self.timeout > 0, "sync.timeout", "a positive number of seconds", self.timeout)
        _check(self.max_response_bytes >= 4096, "sync.max_response_bytes", "at least 4096 bytes",
               self.max_response_bytes)
        _check(self.window_days >= 1, "sync.window_days", "at least 1 day", self.window_days)
        _check(self.page_size >= 2, "sync.page_size", "at least 2", self.page_size)
        _check(self.rate_limit >= 0, "sync.rate_limit", "requests per second >= 0 (0 = unlimited)", self.rate_limit)
        _check(1 <= self.parallel <= 64, "sync.parallel", "1 to 64", self.parallel)
        _check(self.retries >= 1, "sync.retries", "at least 1", self.retries)
        _check(self.max_backoff > 0, "sync.max_backoff", "a positive number of seconds", self.max_backoff)
        _check(self.poll_interval > 0, "sync.poll_interval", "a positive number of seconds", self.poll_interval)
        _check(self.recent_days >= 1, "sync.recent_days", "at least 1 day", self.recent_days)
        _check(self.stable_age >= 0, "sync.stable_age", "a number of seconds >= 0", self.stable_age)
        _check(self.on_delete in ON_DELETE, "sync.on_delete", f"one of {ON_DELETE}", self.on_delete)

    def __repr__(self) -> str:  # never print secrets
        return _repr_hiding_secrets(self)


@dataclass(frozen=True)
class ConvertConfig:
    """`dicom-fhir-scp convert` (the node does not read this section)."""

    jobs: int | None = None  # processes reading headers; None = one per CPU (--jobs)

    def __post_init__(self) -> None:
        _check(self.jobs is None or (not isinstance(self.jobs, bool) and self.jobs >= 1), "convert.jobs",
               "a positive number of processes (1 = read in the command's own process)", self.jobs)


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    mapping: MappingOptions = field(default_factory=MappingOptions)
    fhir: FhirConfig = field(default_factory=FhirConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    senders: tuple[SenderConfig, ...] = ()  # [[senders]], first match wins
    destinations: Mapping[str, FhirConfig] = field(default_factory=dict)  # [fhir.destinations.NAME]
    sync: SyncConfig = field(default_factory=SyncConfig)  # [sync]: the `sync` command
    convert: ConvertConfig = field(default_factory=ConvertConfig)

    def destination_names(self) -> tuple[str, ...]:
        """Every destination a sender may name: "disk" (node.output_dir), "fhir" ([fhir] url), the named ones."""
        names = ("disk",) if self.node.output_dir is not None else ()
        names += ("fhir",) if self.fhir.url else ()
        return names + tuple(self.destinations)


DESTINATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SECTIONS = {"node": NodeConfig, "mapping": MappingOptions, "fhir": FhirConfig,
             "security": SecurityConfig, "operations": OperationsConfig, "hooks": HooksConfig,
             "logging": LoggingConfig,
             "sync": SyncConfig, "convert": ConvertConfig}


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """The validated Config: defaults, then the TOML file, then DICOM_FHIR_SCP_* variables.

    path None: the file named by DICOM_FHIR_SCP_CONFIG, if set; else no file.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_VARIABLE):
        path = Path(environ[CONFIG_VARIABLE])
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = _read_toml(Path(path))
    overrides = environment_overrides(environ)
    if not overrides:
        return config_from_mapping(raw, environ=environ, source=source)
    return _with_environment(raw, overrides, environ, source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"config file {path}: not found") from exc
    except IsADirectoryError as exc:
        raise ConfigurationError(f"config file {path}: is a folder, not a file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"config file {path}: cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path}: {exc}") from exc


def config_from_mapping(raw: Mapping[str, Any], *, environ: Mapping[str, str], source: str = "config") -> Config:
    raw = dict(raw)
    senders = raw.pop("senders", [])
    fhir = raw.get("fhir", {})
    destinations: Mapping[str, Any] = {}
    if isinstance(fhir, Mapping) and "destinations" in fhir:
        fhir = dict(fhir)
        destinations = fhir.pop("destinations")
        raw["fhir"] = fhir
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigurationError(f"{source}: unknown section(s) {sorted(unknown)}; known: "
                                 f"{sorted([*_SECTIONS, 'senders'])}")
    sections = {name: _build(cls, raw.get(name, {}), name, environ, source) for name, cls in _SECTIONS.items()}
    sections["mapping"] = _mapping_version(raw.get("mapping", {}), sections["mapping"], sections["fhir"], source)
    config = Config(**sections, senders=_senders(senders, environ, source),
                    destinations=_destinations(destinations, environ, source, sections["fhir"].version))
    _check_senders(config, source)
    return config


def _senders(raw: Any, environ: Mapping[str, str], source: str) -> tuple[SenderConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(entry, Mapping) for entry in raw):
        raise ConfigurationError(f"{source}: senders must be an array of tables ([[senders]])")
    built = []
    for number, entry in enumerate(raw, 1):
        if "ae_title" not in entry:
            raise ConfigurationError(f"{source}: [[senders]] entry {number}: ae_title is required")
        built.append(_build(SenderConfig, entry, f"senders[{number}]", environ, source))
    return tuple(built)


def _mapping_version(table: Any, mapping: MappingOptions, fhir: FhirConfig, source: str) -> MappingOptions:
    """The mapping writes the node's one FHIR release, fhir.version (mapping.fhir_version may
    only repeat it: it is there because every MappingOptions field is a [mapping] key)."""
    if isinstance(table, Mapping) and "fhir_version" in table and mapping.fhir_version != fhir.version:
        raise ConfigurationError(f"{source}: mapping.fhir_version = {mapping.fhir_version!r} differs from "
                                 f"fhir.version = {fhir.version!r}: set fhir.version only (one FHIR version "
                                 f"per node)")
    return replace(mapping, fhir_version=fhir.version)


def _destinations(raw: Any, environ: Mapping[str, str], source: str,
                  fhir_version: str = "R4") -> dict[str, FhirConfig]:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{source}: fhir.destinations must be a table of [fhir.destinations.NAME]")
    built = {}
    for name, table in raw.items():
        if not DESTINATION_NAME.fullmatch(name) or name in ("disk", "fhir"):
            raise ConfigurationError(f"{source}: fhir.destinations.{name}: a name of letters, digits, - and _ "
                                     f"(not disk or fhir, which name the disk output and [fhir] url)")
        if isinstance(table, Mapping) and table.get("version", fhir_version) != fhir_version:
            raise ConfigurationError(f"{source}: fhir.destinations.{name}.version = {table['version']!r} differs "
                                     f"from fhir.version = {fhir_version!r}: one FHIR version per node (a "
                                     f"destination takes fhir.version; leave its version out)")
        if isinstance(table, Mapping):
            table = {**table, "version": fhir_version}
        destination = _build(FhirConfig, table, f"fhir.destinations.{name}", environ, source)
        if not destination.url:
            raise ConfigurationError(f"{source}: fhir.destinations.{name}.url: required")
        built[name] = destination
    return built


def _check_senders(config: Config, source: str) -> None:
    """Each sender's settings make valid mapping options; its destinations exist."""
    known = config.destination_names()
    for number, sender in enumerate(config.senders, 1):
        where = f"senders[{number}] ({sender.ae_title})"
        try:
            replace(config.mapping, **sender.mapping_overrides())
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: {where}: {exc}") from None
        for name in sender.destinations or ():
            if name not in known:
                raise ConfigurationError(f"{source}: {where}.destinations: {name!r} is not a destination; "
                                         f"known: {', '.join(known) or 'none'}")


def override(config: Config, section: str, **values: Any) -> Config:
    """Return config with non-None values replaced in one section (command-line flags)."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return config
    current = getattr(config, section)
    try:
        config = replace(config, **{section: replace(current, **_coerce_all(type(current), given, section))})
    except TypeError as exc:
        raise ConfigurationError(f"{section}: {exc}") from exc
    if section == "fhir" and "version" in given:  # --fhir-version: the mapping and every destination follow
        config = replace(config, mapping=replace(config.mapping, fhir_version=config.fhir.version),
                         destinations={name: replace(d, version=config.fhir.version)
                                       for name, d in config.destinations.items()})
    return config


def _build(cls: type, values: Mapping[str, Any], section: str, environ: Mapping[str, str], source: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigurationError(f"{source}: [{section}] must be a table")
    names = {f.name for f in fields(cls)}
    resolved: dict[str, Any] = {}
    for key, value in values.items():
        if key.endswith("_env") and key[:-4] in names:
            if value not in environ:
                raise ConfigurationError(f"{source}: {section}.{key} names {value!r}, which is not set in the environment")
            resolved[key[:-4]] = environ[value]
        elif key in names:
            resolved.setdefault(key, value)
        else:
            raise ConfigurationError(f"{source}: unknown key {section}.{key}; known: {sorted(names)}")
    return cls(**_coerce_all(cls, resolved, section))


def _coerce_all(cls: type, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    types = {f.name: str(f.type) for f in fields(cls)}
    return {k: _coerce(v, types.get(k, ""), f"{section}.{k}") for k, v in values.items()}


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """TOML has no Path, tuple or None: convert by the declared field type."""
    if value is None:
        return None
    if "Path" in type_name:
        if not isinstance(value, (str, Path)):
            raise ConfigurationError(f"{where}: expected a path, got {value!r}")
        return None if str(value) == "" and "None" in type_name else Path(value)
    if "Mapping" in type_name:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in value.items()):
            raise ConfigurationError(f"{where}: expected a table of strings (key = \"value\"), got {value!r}")
        return dict(value)
    if "tuple" in type_name:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigurationError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if type_name.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}: expected true or false, got {value!r}")
        return value
    if type_name.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{where}: expected an integer, got {value!r}")
        return value
    if type_name.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if type_name.startswith("str"):
        if not isinstance(value, str):
            raise ConfigurationError(f"{where}: expected a string, got {value!r}")
        return None if value == "" and "None" in type_name else value
    return value


def _check(ok: bool, where: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigurationError(f"{where}: expected {expected}, got {got!r}")


# --- the environment: DICOM_FHIR_SCP_<SECTION>_<KEY> for every key of every section ---------

ENV_PREFIX = "DICOM_FHIR_SCP_"
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"  # the file, not a key
LIST_SEPARATOR = ","  # DICOM_FHIR_SCP_SECURITY_ALLOWED_CALLING_AETS=CT1,MR2 (spaces around items ignored)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class EnvironmentValue:
    """One DICOM_FHIR_SCP_* variable, parsed to the value the TOML file would hold."""

    variable: str
    section: str
    key: str
    value: Any


def variable_name(section: str, key: str) -> str:
    """The environment variable of a configuration key: node.port -> DICOM_FHIR_SCP_NODE_PORT."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def environment_overrides(environ: Mapping[str, str]) -> list[EnvironmentValue]:
    """Every DICOM_FHIR_SCP_* variable (but DICOM_FHIR_SCP_CONFIG) as a typed value.

    Generic over _SECTIONS and their dataclass fields: a section or key added there
    gets its variable without code here. Values are parsed by the field's type (bool:
    true/false/1/0/yes/no/on/off; int; float; lists: comma-separated; paths and
    strings as given, "" = unset where the type allows None). A companion ``x_env``
    (naming another variable holding a secret) is accepted as in the file. An unknown
    variable is an error naming it (a typo must not be ignored silently).
    """
    known = _known_variables()
    found = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_VARIABLE:
            continue
        if variable not in known:
            raise ConfigurationError(f"environment variable {variable}: not a configuration key; "
                                     f"known: {CONFIG_VARIABLE} and {ENV_PREFIX}<SECTION>_<KEY> for the keys of "
                                     f"config/dicom-fhir-scp.toml, e.g. {variable_name('node', 'port')}")
        section, key, type_name = known[variable]
        found.append(EnvironmentValue(variable, section, key, _parse_text(environ[variable], type_name, variable)))
    return found


def _known_variables() -> dict[str, tuple[str, str, str]]:
    """variable -> (section, key, field type) for every key, and every secret's ``_env`` companion."""
    known = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            known[variable_name(section, f.name)] = (section, f.name, str(f.type))
            if "str" in str(f.type) and "None" in str(f.type):  # an optional string may be a secret
                known[variable_name(section, f.name + "_env")] = (section, f.name + "_env", "str")
    return known


def _parse_text(text: str, type_name: str, variable: str) -> Any:
    """The environment's text as the TOML value of a field of type_name (then coerced as the file's)."""
    optional = "None" in type_name
    if text == "" and optional:
        return None  # unset, as the file's "" for paths and strings (a list would become [""])
    if "Mapping" in type_name:  # DICOM_FHIR_SCP_MAPPING_ISSUER_SYSTEMS=HOSP_A=urn:oid:1.2.3,HOSP_B=urn:oid:1.2.4
        table = {}
        for item in (i.strip() for i in text.split(LIST_SEPARATOR)):
            key, equals, value = item.partition("=")
            if item and not equals:
                raise ConfigurationError(f"{variable}: expected KEY=VALUE items separated by commas, got {item!r}")
            if item:
                table[key.strip()] = value.strip()
        return table
    if "tuple" in type_name or "list" in type_name:
        return [item.strip() for item in text.split(LIST_SEPARATOR) if item.strip()]
    if "Path" in type_name or type_name.startswith("str"):
        return text
    word = text.strip().lower()
    if type_name.startswith("bool"):
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigurationError(f"{variable}: expected true or false (also 1/0, yes/no), got {text!r}")
    if type_name.startswith("int"):
        try:
            return int(word)
        except ValueError:
            raise ConfigurationError(f"{variable}: expected an integer, got {text!r}") from None
    if type_name.startswith("float"):
        try:
            return float(word)
        except ValueError:
            raise ConfigurationError(f"{variable}: expected a number, got {text!r}") from None
    return text


def _with_environment(raw: Mapping[str, Any], overrides: list[EnvironmentValue], environ: Mapping[str, str],
                      source: str) -> Config:
    """raw with the environment's values over it, validated; an error names the variables involved."""
    merged: dict[str, Any] = {name: dict(table) if isinstance(table, Mapping) else table
                              for name, table in raw.items()}
    for item in overrides:
        table = merged.setdefault(item.section, {})
        if not isinstance(table, dict):
            break  # config_from_mapping reports the file's broken section
        if item.key.endswith("_env"):  # the variable replaces the file's value and its _env companion
            table.pop(item.key[:-4], None)
        else:
            table.pop(item.key + "_env", None)
        table[item.key] = item.value
    try:
        return config_from_mapping(merged, environ=environ, source=f"{source} + environment")
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (from {_blamed(str(exc), overrides)})") from exc


def _blamed(message: str, overrides: list[EnvironmentValue]) -> str:
    """The variables an error is about: those whose key it names, else every one of its section."""
    named = [o.variable for o in overrides if re.search(rf"\b{re.escape(o.key.removesuffix('_env'))}\b", message)]
    if not named:
        sections = [o for o in overrides if re.search(rf"\b{re.escape(o.section)}\b", message)] or overrides
        named = [o.variable for o in sections]
    return "environment variable " + ", ".join(named) if len(named) == 1 else \
        "environment variables " + ", ".join(named)
