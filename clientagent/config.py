"""The site configuration file (``site.toml``).

Example::

    [server]
    url = "wss://quorum.example.org/ws/agent/"
    token_file = "token.txt"     # or: token = "..."; exactly one of the two
    public_key = "ed25519:..."   # the server's signing key, pinned (manage.py server_key)
    ca_file = "consortium-ca.pem"  # optional: trust only this CA for the wss:// certificate
    allow_insecure = false       # plain ws:// to a host other than this machine is refused
                                 # unless this is true (the network can then read everything)

    [data]
    path = "data.csv"            # .csv or .parquet; relative to this file's folder
    schema = "schema.json"       # optional: the dataset schema registered for this silo
                                 # (`quorum-agent init` proposes it, `check` validates the data
                                 # against it; training uses the schema in each plan)

    [agent]
    name = "site-a"              # optional, shown in logs and sent in hello
    state_dir = "state"          # optional, default ".quorum-agent" next to this file

    [policy]                     # optional; what this site agrees to train, whatever the server says
    consortium = "thyroid"       # refuse to work for any other consortium
    allowed_models = ["logistic_regression"]   # default: every kind fedcore.models knows
    max_epsilon_per_plan = 3.0   # refuse plans whose target epsilon is higher (default: no limit)
    max_epsilon_total = 10.0     # refuse plans that would take the total spent above this
    require_dp = true            # refuse plans without differential privacy (default false)
    require_secure_aggregation = true          # default false
    require_local_approval = true              # train only on plans approved with
                                               # `quorum-agent approve <hash>` (default false)
    min_category_count = 5       # a category held fewer times here is never named in the
                                 # statistics sent to the server (default 5)

    [models]                     # optional: model kinds this site installed itself (pip) and
    allowed = ["resmlp"]         # agrees to train, by entry-point name (group quorum.models);
                                 # default none. A plan must also name the installed version
                                 # and distribution digest (docs/tasks.md)

    [governance]                 # whose approval this site trusts, proven by signature
    steward_keys = ["ed25519:..."]  # the public keys of this site's data stewards
                                    # (`quorum-agent steward-key new` prints one; a passkey's
                                    # "webauthn:-7:..." line is on the dashboard's Passkeys page)

A site trains only on a plan hash approved by a signature of a key in ``steward_keys`` (checked
by the agent itself, :mod:`fedcore.approvals`) or approved locally (``quorum-agent approve``,
with ``require_local_approval = true``). A site.toml with neither still runs, with the server's
word for the approvals, but the agent logs a WARNING at start and on every request: see
docs/security.md.

Every problem (unknown section or key, missing key, wrong type, bad URL, missing file) raises
:class:`ConfigError`, whose message names the file, the key and what to do. Nothing is ignored
silently. Sections are parsed by one function each (``_SECTIONS``): a new section is one parser,
one dataclass and one field on :class:`SiteConfig`.
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedcore.analytics.disclosure import DisclosurePolicy
from fedcore.approvals import ApprovalSignatureError, check_steward_key
from fedcore.model_kinds import ENTRY_POINT_GROUP, MAX_ANNOUNCED, NAME_PATTERN
from fedcore.model_spec import MODEL_KINDS
from fedcore.signing import AuthorizationError, parse_public_key

DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")  # what fedcore.tabular.load_table reads
DEFAULT_STATE_DIR = ".quorum-agent"
SERVER_KEY_SOURCES = (
    "get it from the consortium admin (who prints it with `python manage.py server_key`) or "
    "from GET /api/v1/server-key/ on the server, and compare the two"
)


class ConfigError(ValueError):
    """The site configuration is unusable; the message says where and what to do."""


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` section: where to connect, with which token, and the pinned server key."""

    url: str
    # repr=False: the token must never end up in a log line or a traceback.
    token: str = field(repr=False)
    # ``ed25519:<base64>``: every task must carry a grant signed with this key.
    public_key: str
    # PEM file of the CA the server's TLS certificate must come from (only that CA is trusted);
    # None: the system's trusted CAs.
    ca_file: Path | None = None
    # Plain ws:// to a remote host (token and weights in clear on the network): refused unless set.
    allow_insecure: bool = False

    @property
    def is_loopback(self) -> bool:
        """Whether the URL points at this machine (plain ws:// is then acceptable)."""
        host = urlsplit(self.url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def is_encrypted(self) -> bool:
        """Whether the connection uses TLS (wss://)."""
        return self.url.lower().startswith("wss://")


@dataclass(frozen=True)
class DataConfig:
    """The ``[data]`` section: the local data file and the silo's schema file (absolute paths)."""

    path: Path
    schema: Path | None = None


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent]`` section: optional name and state directory (absolute path)."""

    name: str | None
    state_dir: Path


@dataclass(frozen=True)
class PolicyConfig:
    """The ``[policy]`` section: what this site agrees to, checked on every request.

    The server enforces the consortium's governance; this is the site's own, independent check
    (defence in depth, like Fed-BioMed's node approval and NVIDIA FLARE's site policies).
    """

    consortium: str | None = None
    allowed_models: tuple[str, ...] = MODEL_KINDS
    max_epsilon_per_plan: float | None = None
    max_epsilon_total: float | None = None
    require_dp: bool = False
    require_secure_aggregation: bool = False
    require_local_approval: bool = False
    min_category_count: int = 5


@dataclass(frozen=True)
class ModelsConfig:
    """The ``[models]`` section: the installed model kinds (entry points of the group
    ``quorum.models``) this site agrees to train; none by default."""

    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class GovernanceConfig:
    """The ``[governance]`` section: the stewards' public keys this site pins.

    Empty: the agent takes the server's word that a steward approved (logged as a warning),
    unless ``[policy] require_local_approval`` makes the site operator approve instead.
    """

    steward_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SiteConfig:
    """A parsed and checked ``site.toml``."""

    path: Path
    server: ServerConfig
    data: DataConfig
    agent: AgentConfig
    policy: PolicyConfig = PolicyConfig()
    governance: GovernanceConfig = GovernanceConfig()
    models: ModelsConfig = ModelsConfig()
    # [disclosure]: what this site releases of an analysis plan (docs/analytics.md).
    disclosure: DisclosurePolicy = DisclosurePolicy()

    @property
    def approvals_verified(self) -> bool:
        """Whether an approval is proven to this site (a pinned steward key, or local approval)."""
        return bool(self.governance.steward_keys) or self.policy.require_local_approval

    @property
    def display_name(self) -> str:
        """The name shown in logs: the agent name, else ``agent``."""
        return self.agent.name or "agent"


class _Section:
    """Typed access to one TOML table; every error names the file, section and key."""

    def __init__(self, file: Path, name: str, table: Mapping[str, Any], known: tuple[str, ...]):
        self.file = file
        self.name = name
        self.table = table
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise self.error(
                unknown[0],
                f"unknown key; the known keys of [{name}] are {', '.join(known)}. "
                "Remove it or fix its spelling",
            )

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError for one key of this section."""
        return ConfigError(f"{self.file}: [{self.name}] {key}: {problem}")

    def string(self, key: str, *, required: bool) -> str | None:
        """A non-empty string value, or None when optional and absent."""
        if key not in self.table:
            if required:
                raise self.error(key, f'missing; add {key} = "..." to the [{self.name}] section')
            return None
        value = self.table[key]
        if not isinstance(value, str):
            raise self.error(
                key, f'must be a string in quotes, got {_toml_type(value)}; write {key} = "..."'
            )
        if not value.strip():
            raise self.error(key, "is empty; give a value or remove the key")
        return value.strip()

    def path(self, key: str, *, required: bool) -> Path | None:
        """A path value resolved against the config file's folder."""
        value = self.string(key, required=required)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.file.parent / path
        return path.resolve()

    def boolean(self, key: str, *, default: bool) -> bool:
        """A true/false value."""
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false (no quotes), got {_toml_type(value)}")
        return value

    def positive_number(self, key: str) -> float | None:
        """A finite number > 0, or None when absent."""
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(
                key, f"must be a number (no quotes), got {_toml_type(value)}; write {key} = 3.0"
            )
        if not math.isfinite(value) or value <= 0:
            raise self.error(
                key, f"must be a finite number > 0, got {value}; remove the key for no limit"
            )
        return float(value)

    def string_list(self, key: str) -> tuple[str, ...] | None:
        """A non-empty array of non-empty strings, or None when absent."""
        if key not in self.table:
            return None
        value = self.table[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(
                key, f'must be an array of strings, got {_toml_type(value)}; write {key} = ["..."]'
            )
        items = tuple(dict.fromkeys(item.strip() for item in value))
        if not items or not all(items):
            raise self.error(
                key, "is empty or holds an empty string; list values or remove the key"
            )
        return items


def _toml_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
    }
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _parse_server(section: _Section) -> ServerConfig:
    url = section.string("url", required=True)
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("ws", "wss"):
        raise section.error(
            "url",
            f"{url!r} is not a websocket URL; it must start with ws:// or wss:// "
            '(for example url = "wss://quorum.example.org/ws/agent/")',
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise section.error("url", f"{url!r} has an invalid port number; fix the URL") from None
    if not parts.hostname:
        raise section.error("url", f"{url!r} has no host name; fix the URL")

    has_token = "token" in section.table
    has_file = "token_file" in section.table
    if has_token == has_file:
        raise section.error(
            "token",
            'give exactly one of token = "..." or token_file = "..." '
            f"({'both are' if has_token else 'neither is'} set)",
        )
    if has_token:
        token = section.string("token", required=True)
        key = "token"
    else:
        token_path = section.path("token_file", required=True)
        assert token_path is not None
        key = "token_file"
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise section.error(
                key, f"the token file {token_path} does not exist; create it or fix the path"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise section.error(key, f"cannot read the token file {token_path}: {exc}") from None
        if not token:
            raise section.error(
                key, f"the token file {token_path} is empty; paste the site's token into it"
            )
    assert token is not None
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise section.error(
            key, "the token contains spaces or control characters; copy it again exactly"
        )
    allow_insecure = section.boolean("allow_insecure", default=False)
    server = ServerConfig(
        url=url,
        token=token,
        public_key=_parse_public_key(section),
        ca_file=_parse_ca_file(section, url),
        allow_insecure=allow_insecure,
    )
    if not server.is_encrypted and not server.is_loopback and not allow_insecure:
        raise section.error(
            "url",
            f"{url!r} is plain ws:// to another machine: the token, the global model and this "
            "site's updates would cross the network unencrypted and unauthenticated. Use the "
            "server's wss:// address (with ca_file for the consortium's CA); only on a network "
            "you trust, set allow_insecure = true in [server]",
        )
    return server


def _parse_ca_file(section: _Section, url: str) -> Path | None:
    path = section.path("ca_file", required=False)
    if path is None:
        return None
    if not url.lower().startswith("wss://"):
        raise section.error(
            "ca_file", f"is set but {url!r} is not wss://; use the wss:// address or remove it"
        )
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise section.error(
            "ca_file", f"the CA file {path} does not exist; create it or fix the path"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise section.error(
            "ca_file", f"{path} is not a PEM file of CA certificates ({exc}); fix it"
        ) from None
    return path


def _parse_public_key(section: _Section) -> str:
    if "public_key" not in section.table:
        raise section.error(
            "public_key",
            'missing; add public_key = "ed25519:..." to the [server] section: the consortium '
            "server's signing key, which the agent pins to check that every task was approved "
            f"for this site; {SERVER_KEY_SOURCES}",
        )
    text = section.string("public_key", required=True)
    assert text is not None
    try:
        parse_public_key(text)
    except AuthorizationError as exc:
        raise section.error(
            "public_key",
            f'{text!r} is not an Ed25519 public key ({exc}); it must look like "ed25519:<base64>"; '
            f"copy it again exactly: {SERVER_KEY_SOURCES}",
        ) from None
    return text


def _parse_data(section: _Section) -> DataConfig:
    path = section.path("path", required=True)
    assert path is not None
    if not path.name.lower().endswith(DATA_SUFFIXES):
        raise section.error(
            "path", f"{path} must be a .csv or .parquet file; convert the data or fix the path"
        )
    if not path.exists():
        raise section.error(
            "path",
            f"the data file {path} does not exist; fix the path (relative paths are "
            f"resolved against {section.file.parent})",
        )
    if not path.is_file():
        raise section.error("path", f"{path} is not a file; point it at the .csv or .parquet file")
    schema = section.path("schema", required=False)
    if schema is not None and not schema.is_file():
        raise section.error(
            "schema",
            f"the schema file {schema} does not exist; write it with `quorum-agent init`, fix "
            "the path or remove the key",
        )
    return DataConfig(path=path, schema=schema)


def load_data_config(path: str | Path) -> DataConfig:
    """Only the ``[data]`` section of a ``site.toml``, checked as ``load_config`` checks it.

    For ``quorum-agent check`` on a site.toml whose [server] section is not filled in yet (the
    token comes when the silo is admitted, after its schema was registered).

    Raises:
        ConfigError: the file is unreadable, or [data] is missing or invalid.
    """
    file, document = _read_document(path)
    if "data" not in document or not isinstance(document["data"], dict):
        raise ConfigError(f'{file}: missing section [data]; add it with path = "data.csv"')
    keys, parser, _ = _SECTIONS["data"]
    result: DataConfig = parser(_Section(file, "data", document["data"], keys))
    return result


def _parse_agent(section: _Section) -> AgentConfig:
    name = section.string("name", required=False)
    state_dir = section.path("state_dir", required=False)
    if state_dir is None:
        state_dir = (section.file.parent / DEFAULT_STATE_DIR).resolve()
    return AgentConfig(name=name, state_dir=state_dir)


def _parse_policy(section: _Section) -> PolicyConfig:
    allowed = section.string_list("allowed_models")
    if allowed is not None:
        unknown = [kind for kind in allowed if kind not in MODEL_KINDS]
        if unknown:
            raise section.error(
                "allowed_models",
                f"unknown model kind {unknown[0]!r}; the known kinds are {', '.join(MODEL_KINDS)}",
            )
    return PolicyConfig(
        consortium=section.string("consortium", required=False),
        allowed_models=allowed if allowed is not None else MODEL_KINDS,
        max_epsilon_per_plan=section.positive_number("max_epsilon_per_plan"),
        max_epsilon_total=section.positive_number("max_epsilon_total"),
        require_dp=section.boolean("require_dp", default=False),
        require_secure_aggregation=section.boolean("require_secure_aggregation", default=False),
        require_local_approval=section.boolean("require_local_approval", default=False),
        min_category_count=_min_category_count(section),
    )


def _min_category_count(section: _Section) -> int:
    value = section.table.get("min_category_count", 5)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise section.error(
            "min_category_count",
            f"must be an integer >= 1 (no quotes), got {value!r}; e.g. min_category_count = 5",
        )
    return value


def _parse_models(section: _Section) -> ModelsConfig:
    allowed = section.string_list("allowed") or ()
    if len(set(allowed)) > MAX_ANNOUNCED:  # the server refuses a hello announcing more
        raise section.error(
            "allowed",
            f"lists {len(set(allowed))} kinds; at most {MAX_ANNOUNCED} can be announced to the "
            "server: keep the ones this site trains",
        )
    for name in allowed:
        if not NAME_PATTERN.match(name):
            raise section.error(
                "allowed",
                f"{name!r} is not a model kind's name (an entry point of the group "
                f"{ENTRY_POINT_GROUP!r}, {NAME_PATTERN.pattern}); `python -m "
                "fedcore.model_kinds` lists the installed ones",
            )
        if name in MODEL_KINDS:
            raise section.error(
                "allowed",
                f"{name!r} is a built-in kind: allow it with [policy] allowed_models; [models] "
                "lists kinds this site installed itself",
            )
    return ModelsConfig(allowed=tuple(allowed))


def _parse_governance(section: _Section) -> GovernanceConfig:
    keys = section.string_list("steward_keys") or ()
    for text in keys:
        try:
            check_steward_key(text)
        except ApprovalSignatureError as exc:
            raise section.error(
                "steward_keys",
                f"{text!r} is not a steward key ({exc}); copy exactly the line "
                "`quorum-agent steward-key new` printed, or the passkey key the dashboard shows",
            ) from None
    return GovernanceConfig(steward_keys=keys)


def _parse_disclosure(section: _Section) -> DisclosurePolicy:
    try:
        return DisclosurePolicy.from_dict(dict(section.table))
    except ValueError as exc:
        raise ConfigError(f"{section.file}: [disclosure]: {exc}") from None


POLICY_KEYS = (
    "consortium",
    "allowed_models",
    "max_epsilon_per_plan",
    "max_epsilon_total",
    "require_dp",
    "require_secure_aggregation",
    "require_local_approval",
    "min_category_count",
)

# section -> (known keys, parser, required). Order is the order of the error listing.
_SECTIONS: dict[str, tuple[tuple[str, ...], Callable[[_Section], Any], bool]] = {
    "server": (
        ("url", "token", "token_file", "public_key", "ca_file", "allow_insecure"),
        _parse_server,
        True,
    ),
    "data": (("path", "schema"), _parse_data, True),
    "agent": (("name", "state_dir"), _parse_agent, False),
    "policy": (POLICY_KEYS, _parse_policy, False),
    "governance": (("steward_keys",), _parse_governance, False),
    "models": (("allowed",), _parse_models, False),
    "disclosure": (
        ("min_cell_count", "min_sites", "allowed_analyses", "time_step"),
        _parse_disclosure,
        False,
    ),
}


def load_config(path: str | Path) -> SiteConfig:
    """Read, check and resolve a ``site.toml``; raise ConfigError on any problem.

    Args:
        path: the config file. Relative paths inside it resolve against its folder.

    Returns:
        The parsed configuration, with absolute paths, the token read from its file and the
        server's public key checked.

    Raises:
        ConfigError: with a message naming the file, the key and what to do.
    """
    file, document = _read_document(path)
    known = ", ".join(f"[{name}]" for name in _SECTIONS)
    for name, value in document.items():
        if name not in _SECTIONS:
            raise ConfigError(
                f"{file}: unknown section [{name}]; the known sections are {known}. "
                "Remove it or fix its spelling"
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"{file}: {name} must be a section ([{name}] on its own line followed by its "
                f"keys), got {_toml_type(value)}"
            )

    parsed: dict[str, Any] = {}
    for name, (keys, parser, required) in _SECTIONS.items():
        if name not in document and required:
            raise ConfigError(f"{file}: missing section [{name}]; add it (see the example config)")
        parsed[name] = parser(_Section(file, name, document.get(name, {}), keys))
    return SiteConfig(path=file, **parsed)


def _read_document(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The resolved path and parsed TOML of a config file; ConfigError when unreadable."""
    file = Path(path).expanduser().resolve()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: config file not found; pass the site's config with --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text; save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc}); fix the syntax") from None
    return file, document
