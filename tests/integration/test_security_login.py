"""Password sign-in is rate limited per username and address: after QUORUM_LOGIN_FAILURE_LIMIT
failures the pair is locked out (429 with a clear message, even with the right password), the
lock-out is audited once, and other addresses and usernames are unaffected."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from federation.models import AuditEvent

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture
def user(settings: Any) -> Any:
    settings.QUORUM_LOGIN_FAILURE_LIMIT = 3
    return get_user_model().objects.create_user("alice", password=PASSWORD)


def sign_in(password: str, *, ip: str = "203.0.113.5", username: str = "alice") -> Any:
    return Client(REMOTE_ADDR=ip).post("/login/", {"username": username, "password": password})


def test_repeated_failures_lock_the_pair_out_with_429_and_a_message(user: Any) -> None:
    for _ in range(2):
        response = sign_in("wrong")
        assert response.status_code == 200 and b"Please enter a correct" in response.content
    locked = sign_in("wrong")  # the third failure starts the lock-out
    assert locked.status_code == 429
    assert b"Too many failed sign-ins" in locked.content
    assert locked["Retry-After"] == "900"

    # Locked out even with the right password: the password is not even checked.
    again = sign_in(PASSWORD)
    assert again.status_code == 429 and "_auth_user_id" not in again.client.session
    events = AuditEvent.objects.filter(action="auth.login_locked")
    assert [(e.object_id, e.data["address"]) for e in events] == [("alice", "203.0.113.5")]


def test_the_lockout_is_per_username_and_address(user: Any) -> None:
    get_user_model().objects.create_user("bob", password=PASSWORD)
    for _ in range(3):
        sign_in("wrong")
    assert sign_in(PASSWORD).status_code == 429
    assert sign_in(PASSWORD, ip="198.51.100.1").status_code == 302  # another address
    assert sign_in(PASSWORD, username="bob").status_code == 302  # another user
    assert sign_in(PASSWORD, username="ALICE ").status_code == 429  # same name, other spelling


def test_a_successful_sign_in_resets_the_count(user: Any) -> None:
    sign_in("wrong")
    sign_in("wrong")
    assert sign_in(PASSWORD).status_code == 302
    sign_in("wrong")
    sign_in("wrong")
    assert sign_in(PASSWORD).status_code == 302


def test_the_lockout_ends_after_its_window(user: Any, settings: Any) -> None:
    settings.QUORUM_LOGIN_LOCKOUT_SECONDS = 1
    for _ in range(3):
        sign_in("wrong")
    assert sign_in(PASSWORD).status_code == 429
    time.sleep(1.1)
    assert sign_in(PASSWORD).status_code == 302


def test_the_admin_sign_in_shares_the_lockout(user: Any) -> None:
    user.is_staff = user.is_superuser = True
    user.save()
    for _ in range(3):
        sign_in("wrong")
    response = Client(REMOTE_ADDR="203.0.113.5").post(
        "/admin/login/", {"username": "alice", "password": PASSWORD, "next": "/admin/"}
    )
    assert response.status_code == 200  # the form again, not the redirect of a success
    assert "_auth_user_id" not in response.client.session


def test_unknown_usernames_are_counted_too(user: Any) -> None:
    for _ in range(3):
        sign_in("wrong", username="mallory")
    assert sign_in("wrong", username="mallory").status_code == 429
