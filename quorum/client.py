"""The Python client of the REST API: ``Client(url, token)``; every method returns plain data.

Every failure is a :class:`QuorumError` carrying the server's message, the HTTP status and the
field errors of a 400, so a caller (the CLI among them) never shows a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

API_PREFIX = "/api/v1/"
DEFAULT_TIMEOUT = 30.0
MAX_PAGES = 1000  # a safety stop for a server whose "next" links never end


class QuorumError(Exception):
    """A request the server refused, or one that never reached it.

    Attributes:
        message: what went wrong, in the server's words where it gave some.
        status: the HTTP status (None when the server was not reached).
        field_errors: for a 400, each field's (dotted path's) messages.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        field_errors: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field_errors = field_errors or {}

    def __str__(self) -> str:
        lines = [self.message if self.status is None else f"{self.message} ({self.status})"]
        lines += [f"  {path}: {msg}" for path, msgs in self.field_errors.items() for msg in msgs]
        return "\n".join(lines)


@dataclass
class Download:
    """A downloaded file: its bytes, the SHA-256 the server announced and the one computed."""

    data: bytes
    sha256: str
    expected_sha256: str | None
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.expected_sha256 is not None and self.expected_sha256.lower() == self.sha256


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error body as dotted path -> messages."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            for sub, msgs in _flatten(value, path).items():
                out.setdefault(sub, []).extend(msgs)
    elif isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            out[prefix or "non_field_errors"] = [str(item) for item in detail]
        else:
            for i, item in enumerate(detail):
                for sub, msgs in _flatten(item, f"{prefix}.{i}" if prefix else str(i)).items():
                    out.setdefault(sub, []).extend(msgs)
    else:
        out[prefix or "non_field_errors"] = [str(detail)]
    return out


def error_from_response(status: int, body: bytes, reason: str = "") -> QuorumError:
    """The QuorumError of an HTTP error response (JSON ``{"detail": ...}`` or field errors)."""
    try:
        payload = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        return QuorumError(payload["detail"], status=status)
    if isinstance(payload, dict | list) and payload:
        errors = _flatten(payload)
        general = errors.pop("non_field_errors", [])
        message = "; ".join(general) if general else "the server refused the request"
        return QuorumError(message, status=status, field_errors=errors)
    text = reason or "the server answered with an error"
    if status in (401, 403):
        text = "the server refused the token" if status == 401 else "permission denied"
    return QuorumError(text, status=status)


class Client:
    """A REST API client for one server and one API token (``Authorization: Token <token>``)."""

    def __init__(self, url: str, token: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise QuorumError(
                f"{url!r} is not a server URL: give one like https://quorum.example.org"
            )
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # --- transport ----------------------------------------------------------------------------

    def _url(self, path: str, query: dict[str, Any] | None = None) -> str:
        if path.startswith(("http://", "https://")):
            url = path
        else:
            url = self.url + API_PREFIX + path.lstrip("/")
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return url

    def _open(
        self, method: str, url: str, body: Any = None, *, raw: tuple[bytes, str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        headers = {"Accept": "application/json", "User-Agent": "quorum-cli"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        data = None
        if raw is not None:  # a body already encoded, with its content type (multipart)
            data, headers["Content-Type"] = raw
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            raise error_from_response(exc.code, exc.read(), exc.reason or "") from None
        except urllib.error.URLError as exc:
            raise QuorumError(f"cannot reach the server at {self.url}: {exc.reason}") from None
        except TimeoutError:
            raise QuorumError(
                f"the server at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise QuorumError(f"cannot reach the server at {self.url}: {exc}") from None

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        """One JSON request; the decoded JSON answer (None for an empty one)."""
        raw, _ = self._open(method, self._url(path, query), body)
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise QuorumError(
                f"the server at {self.url} did not answer with JSON: is this a Quorum server?"
            ) from None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def get_object(self, path: str, what: str) -> Any:
        """One object; a 404 names it ("plan 7: not found or not visible to you")."""
        try:
            return self.get(path)
        except QuorumError as exc:
            if exc.status == 404:
                raise QuorumError(
                    f"{what}: not found, or not in a consortium of yours", status=404
                ) from None
            raise

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})

    def list(self, path: str, **query: Any) -> list[dict[str, Any]]:
        """Every item of a paginated list endpoint (follows ``next``)."""
        page = self.get(path, **query)
        if isinstance(page, list):
            return page
        items = list(page.get("results", []))
        for _ in range(MAX_PAGES):
            if not page.get("next"):
                break
            page = self.request("GET", page["next"])
            items.extend(page.get("results", []))
        return items

    def download(self, path: str, expected_sha256: str | None = None) -> Download:
        """A binary file; its SHA-256 compared with ``expected_sha256`` or the server's header."""
        data, headers = self._open("GET", self._url(path))
        expected = expected_sha256
        if expected is None:
            for name in ("x-checksum-sha256", "x-content-sha256", "x-sha256"):
                if headers.get(name):
                    expected = headers[name].strip()
                    break
        if expected is None and headers.get("digest", "").lower().startswith("sha-256="):
            try:
                expected = base64.b64decode(headers["digest"].split("=", 1)[1]).hex()
            except ValueError:
                expected = None
        return Download(
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            expected_sha256=expected,
            content_type=headers.get("content-type", ""),
            headers=headers,
        )

    # --- the API ------------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        return self.get("me/")

    def silos(self, **filters: Any) -> list[dict[str, Any]]:
        return self.list("silos/", **filters)

    def silo(self, silo_id: int) -> dict[str, Any]:
        return self.get_object(f"silos/{silo_id}/", f"silo {silo_id}")

    def consortium(self, consortium_id: int) -> dict[str, Any]:
        return self.get_object(f"consortia/{consortium_id}/", f"consortium {consortium_id}")

    def consortia(self) -> list[dict[str, Any]]:
        return self.list("consortia/")

    def plans(self, **filters: Any) -> list[dict[str, Any]]:
        return self.list("plans/", **filters)

    def plan(self, plan_id: int) -> dict[str, Any]:
        return self.get_object(f"plans/{plan_id}/", f"plan {plan_id}")

    def propose_plan(
        self,
        *,
        consortium: int,
        name: str,
        spec: dict[str, Any],
        silos: list[int],
        description: str = "",
        submit: bool = True,
    ) -> dict[str, Any]:
        body = {
            "consortium": consortium,
            "name": name,
            "description": description,
            "spec": spec,
            "silos": silos,
            "submit": submit,
        }
        return self.post("plans/", body)

    def approve_plan(
        self,
        plan_id: int,
        *,
        plan_hash: str,
        organization: int | None = None,
        signature: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"plan_hash": plan_hash}
        if organization is not None:
            body["organization"] = organization
        if signature is not None:
            body["signature"] = signature
        return self.post(f"plans/{plan_id}/approve/", body)

    def reject_plan(
        self, plan_id: int, *, plan_hash: str, reason: str, organization: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"plan_hash": plan_hash, "reason": reason}
        if organization is not None:
            body["organization"] = organization
        return self.post(f"plans/{plan_id}/reject/", body)

    def start_run(self, plan_id: int) -> dict[str, Any]:
        return self.post("runs/", {"plan": plan_id})

    def run(self, run_id: int) -> dict[str, Any]:
        return self.get_object(f"runs/{run_id}/", f"run {run_id}")

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        return self.list(f"runs/{run_id}/rounds/")

    def run_models(self, run_id: int) -> list[dict[str, Any]]:
        return self.list(f"runs/{run_id}/models/")

    def fairness(self, run_id: int) -> Any:
        return self.get(f"runs/{run_id}/fairness/")

    def privacy(self, run_id: int) -> Any:
        return self.get(f"runs/{run_id}/privacy/")

    def analysis(self, run_id: int) -> dict[str, Any]:
        return self.get_object(f"runs/{run_id}/analysis/", f"the analysis of run {run_id}")

    def model_version(self, version_id: int) -> dict[str, Any]:
        return self.get(f"models/{version_id}/")

    def model_card(self, version_id: int) -> dict[str, Any]:
        return self.get(f"models/{version_id}/card/")

    def uploaded_models(self, consortium_id: int) -> list[dict[str, Any]]:
        return self.list(f"consortia/{consortium_id}/models/")

    def upload_model(
        self,
        consortium_id: int,
        *,
        name: str,
        description: str,
        model: Any,
        schema: Any,
        preprocessing: Any,
        weights: bytes,
        filename: str = "model.safetensors",
    ) -> dict[str, Any]:
        """Upload a model (multipart/form-data: the JSON parts as text, the weights a file)."""
        fields = {
            "name": name,
            "description": description,
            "model": json.dumps(model),
            "schema": json.dumps(schema),
            "preprocessing": json.dumps(preprocessing),
        }
        boundary = "quorum-" + hashlib.sha256(weights).hexdigest()[:32]
        parts: list[bytes] = []
        for key, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
                + value.encode("utf-8")
                + b"\r\n"
            )
        safe = filename.replace('"', "").replace("\r", "").replace("\n", "") or "model"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; '
            f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + weights
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        raw = (b"".join(parts), f"multipart/form-data; boundary={boundary}")
        answer, _ = self._open("POST", self._url(f"consortia/{consortium_id}/models/"), raw=raw)
        return json.loads(answer.decode("utf-8"))

    # --- onboarding ---------------------------------------------------------------------------

    def obtain_token(
        self, *, username: str, password: str, name: str = "quorum login", days: int | None = None
    ) -> dict[str, Any]:
        """A new API token for a username and password (``token`` is in the answer, once)."""
        body: dict[str, Any] = {"username": username, "password": password, "name": name}
        if days is not None:
            body["days"] = days
        return self.post("auth/token/", body)

    def accept_invitation(
        self, token: str, *, username: str = "", password: str = ""
    ) -> dict[str, Any]:
        """Accept an invitation: as a newcomer (username, password) or, with a token, as yourself."""
        return self.post(
            "invitations/accept/", {"token": token, "username": username, "password": password}
        )

    def organizations(self, consortium_id: int) -> list[dict[str, Any]]:
        return self.list(f"consortia/{consortium_id}/organizations/")

    def create_organization(
        self, consortium_id: int, *, name: str, kind: str = "other"
    ) -> dict[str, Any]:
        return self.post(f"consortia/{consortium_id}/organizations/", {"name": name, "kind": kind})

    def invite(
        self,
        consortium_id: int,
        *,
        email: str,
        organization: int,
        role: str,
        days: int | None = None,
    ) -> dict[str, Any]:
        """Invite by e-mail; the answer carries the ``link`` (shown only here)."""
        body: dict[str, Any] = {"email": email, "organization": organization, "role": role}
        if days is not None:
            body["days"] = days
        return self.post(f"consortia/{consortium_id}/invitations/", body)

    def register_silo(
        self,
        *,
        organization: int,
        name: str,
        schema: dict[str, Any],
        row_count: int,
        description: str = "",
        location: str = "",
    ) -> dict[str, Any]:
        body = {
            "organization": organization,
            "name": name,
            "schema": schema,
            "row_count": row_count,
            "description": description,
            "location": location,
        }
        return self.post("silos/", body)

    def admit_silo(self, silo_id: int) -> dict[str, Any]:
        """Admit a pending silo; the answer's ``token`` is its agent token, shown only here."""
        return self.post(f"silos/{silo_id}/admit/")
