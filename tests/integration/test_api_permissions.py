"""The authorization matrix of the REST API: every endpoint x every role, exactly as documented.

MATRIX is copied verbatim into docs/api.md (a test below keeps the two equal). Columns are users
of the consortium under test, all members of its first organisation, plus "other" (a consortium
admin of ANOTHER consortium) and "anonymous" (no credentials). Object rows use objects of the
consortium under test, in a state where the action is possible: the plan to submit is a draft,
the plan to decide on is submitted, the silo to admit is pending, and so on. The data scientist
is the proposer of every plan. Each cell runs in a savepoint that is rolled back, so every role
sees the same world.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from federation.services.api_tokens import api_token_create
from tests.api_factories import ROLES, World, build_world, fast_password_hashing  # noqa: F401
from tests.factories import SCHEMA, plan_spec
from tests.governance_factories import UserFactory

pytestmark = pytest.mark.django_db


def _invitation(w: World) -> Any:
    from federation.models import Membership

    return Membership.objects.create(
        user=w.gov.org_admins[0],
        organization=w.gov.orgs[1],
        role="auditor",
        status=Membership.Status.PENDING,
        granted_by=w.gov.admin,
    )


def _email_invitation(w: World) -> Any:
    from federation.services.invitations import invitation_create

    return invitation_create(
        actor=w.gov.admin, organization=w.gov.orgs[0], email="inv@example.org", role="auditor"
    ).invitation


def _newcomer_login() -> dict[str, str]:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username="newcomer")
    user.set_password("a-long-enough-passphrase")
    user.save()
    return {"username": "newcomer", "password": "a-long-enough-passphrase"}


def _link_token(w: World) -> str:
    from federation.services.invitations import invitation_create

    return invitation_create(
        actor=w.gov.admin, organization=w.gov.orgs[0], email="new@example.org", role="auditor"
    ).token


def _membership(w: World, column: str) -> Any:
    from federation.models import Membership

    return Membership.objects.get(user=getattr(w.gov, column)[0], organization=w.gov.orgs[0])


def _model(w: World) -> Any:
    """Model v0 of the run under test (with its fitted preprocessing, so ONNX can export it)."""
    from federation.models import Run
    from tests.dashboard_factories import fitted_preprocessing, store_model

    Run.objects.filter(pk=w.run.pk).update(preprocessing=fitted_preprocessing(SCHEMA))
    w.run.refresh_from_db()
    return store_model(w.run, 0, None)


def _upload_body(w: World) -> dict[str, Any]:
    """A valid multipart upload: a logistic regression on the schema's three columns."""
    import io
    import json

    from fedcore import tensors
    from fedcore.models import build_model
    from tests.dashboard_factories import fitted_preprocessing

    weights = tensors.encode_state_dict(
        build_model({"kind": "logistic_regression"}, 3).state_dict()
    )
    return {
        "name": "uploaded",
        "model": json.dumps({"kind": "logistic_regression"}),
        "schema": json.dumps(SCHEMA),
        "preprocessing": json.dumps(fitted_preprocessing(SCHEMA)),
        "weights": io.BytesIO(weights),
    }


def _uploaded(w: World) -> Any:
    """A model the scientist uploaded to the consortium under test."""
    import json

    from federation.services.uploaded_models import uploaded_model_create

    body = _upload_body(w)
    return uploaded_model_create(
        actor=w.gov.scientists[0],
        consortium=w.gov.consortium,
        name=body["name"],
        description="",
        model=json.loads(body["model"]),
        schema=SCHEMA,
        preprocessing=json.loads(body["preprocessing"]),
        weights=body["weights"].getvalue(),
    )


MATRIX = """
| Endpoint                                  | admin | org_admin | steward | scientist | auditor | other | anonymous |
|-------------------------------------------|-------|-----------|---------|-----------|---------|-------|-----------|
| GET /api/v1/                              | 200   | 200       | 200     | 200       | 200     | 200   | 200       |
| GET /api/v1/me/                           | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| GET /api/v1/me/tokens/                    | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| POST /api/v1/me/tokens/                   | 201   | 201       | 201     | 201       | 201     | 201   | 401       |
| DELETE /api/v1/me/tokens/{id}/            | 204   | 404       | 404     | 404       | 404     | 404   | 401       |
| GET /api/v1/consortia/                    | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| GET /api/v1/consortia/{id}/               | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/consortia/{id}/organizations/ | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/consortia/{id}/members/       | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/consortia/{id}/members/      | 201   | 201       | 403     | 403       | 403     | 404   | 401       |
| POST /api/v1/memberships/{id}/accept/     | 404   | 200       | 404     | 404       | 404     | 404   | 401       |
| POST /api/v1/consortia/{id}/organizations/ | 201   | 403       | 403     | 403       | 403     | 404   | 401       |
| GET /api/v1/consortia/{id}/invitations/   | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/consortia/{id}/invitations/  | 201   | 201       | 403     | 403       | 403     | 404   | 401       |
| POST /api/v1/invitations/{id}/revoke/     | 200   | 200       | 404     | 404       | 404     | 404   | 401       |
| GET /api/v1/memberships/{id}/             | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| PATCH /api/v1/memberships/{id}/           | 200   | 200       | 403     | 403       | 403     | 404   | 401       |
| POST /api/v1/memberships/{id}/deactivate/ | 200   | 200       | 403     | 403       | 200     | 404   | 401       |
| GET /api/v1/silos/                        | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| POST /api/v1/silos/                       | 403   | 403       | 201     | 403       | 403     | 400   | 401       |
| GET /api/v1/silos/{id}/                   | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/silos/{id}/admit/            | 200   | 403       | 403     | 403       | 403     | 404   | 401       |
| POST /api/v1/silos/{id}/reject/           | 200   | 403       | 403     | 403       | 403     | 404   | 401       |
| POST /api/v1/silos/{id}/rotate-token/     | 200   | 403       | 200     | 403       | 403     | 404   | 401       |
| POST /api/v1/silos/{id}/revoke-token/     | 200   | 403       | 200     | 403       | 403     | 404   | 401       |
| GET /api/v1/silos/{id}/budget/            | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| PUT /api/v1/silos/{id}/budget/            | 200   | 403       | 403     | 403       | 403     | 404   | 401       |
| GET /api/v1/plans/                        | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| POST /api/v1/plans/                       | 403   | 403       | 403     | 201       | 403     | 400   | 401       |
| GET /api/v1/plans/{id}/                   | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| PUT /api/v1/plans/{id}/                   | 403   | 403       | 403     | 200       | 403     | 404   | 401       |
| GET /api/v1/plans/{id}/versions/          | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/plans/{id}/versions/{number}/ | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/plans/{id}/diff/              | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/plans/{id}/submit/           | 403   | 403       | 403     | 200       | 403     | 404   | 401       |
| POST /api/v1/plans/{id}/withdraw/         | 403   | 403       | 403     | 200       | 403     | 404   | 401       |
| POST /api/v1/plans/{id}/approve/          | 403   | 201       | 201     | 403       | 403     | 404   | 401       |
| POST /api/v1/plans/{id}/reject/           | 403   | 201       | 201     | 403       | 403     | 404   | 401       |
| GET /api/v1/plans/{id}/approvals/         | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/                         | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| POST /api/v1/runs/                        | 201   | 403       | 403     | 201       | 403     | 400   | 401       |
| GET /api/v1/runs/{id}/                    | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/runs/{id}/stop/              | 200   | 403       | 403     | 200       | 403     | 404   | 401       |
| GET /api/v1/runs/{id}/rounds/             | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/models/             | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/consortia/{id}/privacy/       | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/fairness/           | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/privacy/            | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/analysis/           | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/compliance/         | 200   | 403       | 403     | 403       | 200     | 404   | 401       |
| GET /api/v1/runs/{id}/compliance.pdf      | 200   | 403       | 403     | 403       | 200     | 404   | 401       |
| GET /api/v1/models/{id}/                  | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/models/{id}/download/         | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/models/{id}/onnx/             | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/models/{id}/card/             | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/consortia/{id}/models/        | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| POST /api/v1/consortia/{id}/models/       | 201   | 403       | 403     | 201       | 403     | 404   | 401       |
| GET /api/v1/uploaded-models/{id}/         | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/uploaded-models/{id}/download/ | 200   | 200       | 200     | 200       | 200     | 404   | 401       |
| GET /api/v1/audit/events/                 | 200   | 403       | 403     | 403       | 200     | 200   | 401       |
| GET /api/v1/audit/head/                   | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| GET /api/v1/server-key/                   | 200   | 200       | 200     | 200       | 200     | 200   | 401       |
| POST /api/v1/auth/token/                  | 201   | 201       | 201     | 201       | 201     | 201   | 201       |
| POST /api/v1/invitations/accept/          | 409   | 409       | 409     | 409       | 409     | 409   | 201       |
""".strip()

Request = tuple[str, Callable[[World], dict[str, Any] | None]]


def _body(build: Callable[[World], dict[str, Any]]) -> Callable[[World], dict[str, Any]]:
    return build


def _none(w: World) -> None:
    return None


# For each row: the URL's objects and the request body (a valid one: the matrix is about roles).
REQUESTS: dict[str, tuple[Callable[[World], str], Callable[[World], Any]]] = {
    "GET /api/v1/": (lambda w: "/api/v1/", _none),
    "GET /api/v1/me/": (lambda w: "/api/v1/me/", _none),
    "GET /api/v1/me/tokens/": (lambda w: "/api/v1/me/tokens/", _none),
    "POST /api/v1/me/tokens/": (lambda w: "/api/v1/me/tokens/", lambda w: {"name": "ci"}),
    "DELETE /api/v1/me/tokens/{id}/": (
        lambda w: f"/api/v1/me/tokens/{api_token_create(actor=None, user=w.gov.admin).row.pk}/",
        _none,
    ),
    "GET /api/v1/consortia/": (lambda w: "/api/v1/consortia/", _none),
    "GET /api/v1/consortia/{id}/": (lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/", _none),
    "GET /api/v1/consortia/{id}/organizations/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/organizations/",
        _none,
    ),
    "GET /api/v1/consortia/{id}/members/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/members/",
        _none,
    ),
    "POST /api/v1/consortia/{id}/members/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/members/",
        lambda w: {"user": "newcomer", "organization": w.gov.orgs[0].pk, "role": "auditor"},
    ),
    # An invitation addressed to the org_admin column's user: only they may accept it.
    "POST /api/v1/memberships/{id}/accept/": (
        lambda w: f"/api/v1/memberships/{_invitation(w).pk}/accept/",
        _none,
    ),
    "POST /api/v1/consortia/{id}/organizations/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/organizations/",
        lambda w: {"name": "West lab", "kind": "research_lab"},
    ),
    "GET /api/v1/consortia/{id}/invitations/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/invitations/",
        _none,
    ),
    "POST /api/v1/consortia/{id}/invitations/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/invitations/",
        lambda w: {"email": "new@example.org", "organization": w.gov.orgs[0].pk, "role": "auditor"},
    ),
    # An open invitation the consortium admin sent to the first organisation.
    "POST /api/v1/invitations/{id}/revoke/": (
        lambda w: f"/api/v1/invitations/{_email_invitation(w).pk}/revoke/",
        _none,
    ),
    "GET /api/v1/memberships/{id}/": (
        lambda w: f"/api/v1/memberships/{_membership(w, 'scientists').pk}/",
        _none,
    ),
    # The scientist's role: nobody changes their own, so the scientist column is 403 too.
    "PATCH /api/v1/memberships/{id}/": (
        lambda w: f"/api/v1/memberships/{_membership(w, 'scientists').pk}/",
        lambda w: {"role": "auditor"},
    ),
    # The auditor's membership: the auditor may resign from it.
    "POST /api/v1/memberships/{id}/deactivate/": (
        lambda w: f"/api/v1/memberships/{_membership(w, 'auditors').pk}/deactivate/",
        _none,
    ),
    "GET /api/v1/silos/": (lambda w: "/api/v1/silos/", _none),
    "POST /api/v1/silos/": (
        lambda w: "/api/v1/silos/",
        lambda w: {
            "organization": w.gov.orgs[0].pk,
            "name": "new-silo",
            "schema": SCHEMA,
            "row_count": 10,
        },
    ),
    "GET /api/v1/silos/{id}/": (lambda w: f"/api/v1/silos/{w.gov.silos[0].pk}/", _none),
    "POST /api/v1/silos/{id}/admit/": (
        lambda w: f"/api/v1/silos/{w.pending_silo.pk}/admit/",
        _none,
    ),
    "POST /api/v1/silos/{id}/reject/": (
        lambda w: f"/api/v1/silos/{w.pending_silo.pk}/reject/",
        lambda w: {"reason": "no data use agreement yet"},
    ),
    "POST /api/v1/silos/{id}/rotate-token/": (
        lambda w: f"/api/v1/silos/{w.gov.silos[0].pk}/rotate-token/",
        _none,
    ),
    "POST /api/v1/silos/{id}/revoke-token/": (
        lambda w: f"/api/v1/silos/{w.gov.silos[0].pk}/revoke-token/",
        _none,
    ),
    "GET /api/v1/silos/{id}/budget/": (
        lambda w: f"/api/v1/silos/{w.gov.silos[0].pk}/budget/",
        _none,
    ),
    "PUT /api/v1/silos/{id}/budget/": (
        lambda w: f"/api/v1/silos/{w.gov.silos[0].pk}/budget/",
        lambda w: {"epsilon": 8.0, "delta": 1e-5},
    ),
    "GET /api/v1/plans/": (lambda w: "/api/v1/plans/", _none),
    "POST /api/v1/plans/": (
        lambda w: "/api/v1/plans/",
        lambda w: {
            "consortium": w.gov.consortium.pk,
            "name": "new plan",
            "spec": plan_spec(seed=11),
            "silos": [w.gov.silos[0].pk],
        },
    ),
    "GET /api/v1/plans/{id}/": (lambda w: f"/api/v1/plans/{w.submitted.pk}/", _none),
    "PUT /api/v1/plans/{id}/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/",
        lambda w: {"spec": plan_spec(seed=12), "silos": [w.gov.silos[0].pk]},
    ),
    "GET /api/v1/plans/{id}/versions/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/versions/",
        _none,
    ),
    "GET /api/v1/plans/{id}/versions/{number}/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/versions/1/",
        _none,
    ),
    "GET /api/v1/plans/{id}/diff/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/diff/?from=1&to=1",
        _none,
    ),
    "POST /api/v1/plans/{id}/submit/": (lambda w: f"/api/v1/plans/{w.draft.pk}/submit/", _none),
    "POST /api/v1/plans/{id}/withdraw/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/withdraw/",
        _none,
    ),
    "POST /api/v1/plans/{id}/approve/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/approve/",
        lambda w: {"plan_hash": w.submitted.current_version.spec_hash},
    ),
    "POST /api/v1/plans/{id}/reject/": (
        lambda w: f"/api/v1/plans/{w.submitted.pk}/reject/",
        lambda w: {"plan_hash": w.submitted.current_version.spec_hash, "reason": "too few rows"},
    ),
    "GET /api/v1/plans/{id}/approvals/": (
        lambda w: f"/api/v1/plans/{w.approved.pk}/approvals/",
        _none,
    ),
    "GET /api/v1/runs/": (lambda w: "/api/v1/runs/", _none),
    "POST /api/v1/runs/": (lambda w: "/api/v1/runs/", lambda w: {"plan": w.approved.pk}),
    "GET /api/v1/runs/{id}/": (lambda w: f"/api/v1/runs/{w.run.pk}/", _none),
    "POST /api/v1/runs/{id}/stop/": (lambda w: f"/api/v1/runs/{w.run.pk}/stop/", _none),
    "GET /api/v1/runs/{id}/rounds/": (lambda w: f"/api/v1/runs/{w.run.pk}/rounds/", _none),
    "GET /api/v1/runs/{id}/models/": (lambda w: f"/api/v1/runs/{w.run.pk}/models/", _none),
    "GET /api/v1/consortia/{id}/privacy/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/privacy/",
        _none,
    ),
    "GET /api/v1/runs/{id}/fairness/": (lambda w: f"/api/v1/runs/{w.run.pk}/fairness/", _none),
    "GET /api/v1/runs/{id}/privacy/": (lambda w: f"/api/v1/runs/{w.run.pk}/privacy/", _none),
    "GET /api/v1/runs/{id}/analysis/": (lambda w: f"/api/v1/runs/{w.run.pk}/analysis/", _none),
    "GET /api/v1/runs/{id}/compliance/": (
        lambda w: f"/api/v1/runs/{w.run.pk}/compliance/",
        _none,
    ),
    "GET /api/v1/runs/{id}/compliance.pdf": (
        lambda w: f"/api/v1/runs/{w.run.pk}/compliance.pdf",
        _none,
    ),
    "GET /api/v1/models/{id}/": (lambda w: f"/api/v1/models/{_model(w).pk}/", _none),
    "GET /api/v1/models/{id}/download/": (
        lambda w: f"/api/v1/models/{_model(w).pk}/download/",
        _none,
    ),
    "GET /api/v1/models/{id}/onnx/": (lambda w: f"/api/v1/models/{_model(w).pk}/onnx/", _none),
    "GET /api/v1/models/{id}/card/": (lambda w: f"/api/v1/models/{_model(w).pk}/card/", _none),
    "GET /api/v1/consortia/{id}/models/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/models/",
        _none,
    ),
    "POST /api/v1/consortia/{id}/models/": (
        lambda w: f"/api/v1/consortia/{w.gov.consortium.pk}/models/",
        _upload_body,
    ),
    "GET /api/v1/uploaded-models/{id}/": (
        lambda w: f"/api/v1/uploaded-models/{_uploaded(w).pk}/",
        _none,
    ),
    "GET /api/v1/uploaded-models/{id}/download/": (
        lambda w: f"/api/v1/uploaded-models/{_uploaded(w).pk}/download/",
        _none,
    ),
    "GET /api/v1/audit/events/": (lambda w: "/api/v1/audit/events/", _none),
    "GET /api/v1/audit/head/": (lambda w: "/api/v1/audit/head/", _none),
    "GET /api/v1/server-key/": (lambda w: "/api/v1/server-key/", _none),
    # The body's username and password decide, not the caller: anyone gets a token for them.
    "POST /api/v1/auth/token/": (lambda w: "/api/v1/auth/token/", lambda w: _newcomer_login()),
    # A newcomer's link: anonymous chooses a username; a signed-in caller is not its address.
    "POST /api/v1/invitations/accept/": (
        lambda w: "/api/v1/invitations/accept/",
        lambda w: {
            "token": _link_token(w),
            "username": "invitee",
            "password": "a-long-enough-passphrase",
        },
    ),
}


def parse_matrix(text: str) -> dict[str, dict[str, int]]:
    """{"GET /api/v1/me/": {"admin": 200, ...}, ...} from the Markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert tuple(header[1:]) == ROLES
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(ROLES, map(int, cells[1:]), strict=True))
    return rows


EXPECTED = parse_matrix(MATRIX)


def call(world: World, role: str, endpoint: str) -> Any:
    """Send the row's request as the role."""
    method, _ = endpoint.split(" ", 1)
    url, body = REQUESTS[endpoint]
    client = world.client(role)
    data = body(world)
    upload = isinstance(data, dict) and any(hasattr(v, "read") for v in data.values())
    return getattr(client, method.lower())(
        url(world), data, format="multipart" if upload else "json"
    )


def test_every_endpoint_has_a_row_and_a_request() -> None:
    from django.urls import get_resolver

    assert EXPECTED.keys() == REQUESTS.keys()
    # Every API route (but the JSON 404 catch-all) appears in the matrix.
    api = get_resolver().url_patterns
    routes = {
        str(p.pattern)
        for inc in api
        if str(inc.pattern) == "api/v1/"
        for p in inc.url_patterns
        if p.name != "not-found"
    }
    documented = {
        key.split(" ", 1)[1]
        .removeprefix("/api/v1/")
        .replace("{id}", "<int:pk>")
        .replace("{number}", "<int:number>")
        for key in EXPECTED
    }
    assert routes == documented


@pytest.mark.parametrize("endpoint", list(EXPECTED))
def test_authorization_matrix(endpoint: str) -> None:
    world = build_world()
    UserFactory(username="newcomer")
    actual = {}
    for role in ROLES:
        with transaction.atomic():
            response = call(world, role, endpoint)
            actual[role] = response.status_code
            if response.status_code == 404:
                # A foreign object answers exactly like a missing one.
                assert response.json() == {"detail": "Not found."}
            transaction.set_rollback(True)
    assert actual == EXPECTED[endpoint]


def test_anonymous_gets_401_with_the_token_challenge() -> None:
    world = build_world()
    response = world.client("anonymous").get("/api/v1/plans/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Token"


def test_objects_of_another_consortium_look_exactly_like_missing_ones() -> None:
    world = build_world()
    client = world.client("admin")
    other = world.other
    foreign = {
        "consortia": other.consortium.pk,
        "silos": other.silos[0].pk,
        "plans": world.foreign_plan.pk,
        "runs": world.foreign_run.pk,
    }
    for kind, pk in foreign.items():
        missing = 10**6 + pk
        for suffix in (
            "",
            "members/" if kind == "consortia" else "versions/" if kind == "plans" else "",
        ):
            seen = client.get(f"/api/v1/{kind}/{pk}/{suffix}")
            absent = client.get(f"/api/v1/{kind}/{missing}/{suffix}")
            assert seen.status_code == absent.status_code == 404
            assert seen.content == absent.content
    for action in ("approve", "withdraw", "submit"):
        seen = client.post(f"/api/v1/plans/{world.foreign_plan.pk}/{action}/", {}, format="json")
        assert seen.status_code == 404
        assert seen.json() == {"detail": "Not found."}


@pytest.mark.parametrize(
    "url", ["/api/v1/consortia/", "/api/v1/silos/", "/api/v1/plans/", "/api/v1/runs/"]
)
def test_lists_show_nothing_of_other_consortia(url: str) -> None:
    world = build_world()
    mine = world.client("admin").get(url).json()["results"]
    theirs = world.client("other").get(url).json()["results"]
    assert mine and theirs
    assert {item["id"] for item in mine}.isdisjoint(item["id"] for item in theirs)


def test_audit_events_are_only_those_of_the_readers_consortia() -> None:
    world = build_world()
    ours = world.client("auditor").get("/api/v1/audit/events/").json()["results"]
    theirs = world.client("other").get("/api/v1/audit/events/").json()["results"]
    assert ours and theirs
    assert {e["consortium_id"] for e in ours} == {world.gov.consortium.pk}
    assert {e["consortium_id"] for e in theirs} == {world.other.consortium.pk}


def test_docs_carry_the_same_matrix() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert MATRIX in docs
