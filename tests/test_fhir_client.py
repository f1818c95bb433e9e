"""pipeline/fhir/: configuration, auth modes, refresh on 401, retries, paged search.

FHIR calls go to the real sekmet server (open, or demanding a bearer token); only the OAuth2 token
endpoint for expiry/refresh counting and the fault cases use small local stubs.
"""
from __future__ import annotations

import json
import logging
import pickle
import time

import pytest
import requests

from pipeline.core import nhs
from pipeline.core.errors import InputError
from pipeline.fhir.answers import FhirAuthError, FhirError, outcome_text, status_code
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search, search_total
from pipeline.fhir.sessions import open_session
from tests.fixtures.fhir import ACCEPTED_TOKENS, SMART_CLIENT_ID, SMART_CLIENT_SECRET
from tests.fixtures.fhir_proxy import FaultProxy
from tests.fixtures.http_stub import Reply, StubServer, TokenEndpoint

FHIR_ENV = [
    "FHIR_URL", "FHIR_AUTH", "FHIR_TOKEN", "FHIR_TOKEN_FILE", "FHIR_TOKEN_URL", "FHIR_CLIENT_ID",
    "FHIR_SCOPE", "FHIR_CLIENT_SECRET", "FHIR_CLIENT_SECRET_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
    "FHIR_USERNAME", "FHIR_PASSWORD", "FHIR_PASSWORD_FILE",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FHIR_ENV:
        monkeypatch.delenv(name, raising=False)


def _patients_ok(session: requests.Session, base_url: str) -> bool:
    return session.get(f"{base_url}/Patient", params={"_count": 1}).status_code == 200


# --- configuration ---------------------------------------------------------------------------------


def test_config_from_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_URL", "https://fhir.example.org/fhir/")
    monkeypatch.setenv("FHIR_AUTH", "client-credentials")
    monkeypatch.setenv("FHIR_TOKEN_URL", "https://login.example.org/token")
    monkeypatch.setenv("FHIR_CLIENT_ID", "abc")
    monkeypatch.setenv("FHIR_SCOPE", "https://fhir.example.org/.default")
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "do-not-keep-me")
    config = FhirClientConfig.from_env(timeout=5.0, scope=None)
    assert config.base_url == "https://fhir.example.org/fhir"
    assert (config.auth, config.client_id, config.scope, config.timeout) == (
        "client-credentials", "abc", "https://fhir.example.org/.default", 5.0,
    )
    # Picklable for Beam workers, and no secret travels with it.
    assert "do-not-keep-me" not in repr(pickle.loads(pickle.dumps(config)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_url": ""}, "FHIR_URL"),
        ({"base_url": "http://x/fhir", "auth": "digest"}, "unknown FHIR auth mode 'digest'"),
        ({"base_url": "http://x/fhir", "auth": "client-credentials"}, "FHIR_TOKEN_URL and FHIR_CLIENT_ID"),
    ],
)
def test_config_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        FhirClientConfig(**kwargs)


def test_response_status_and_outcome_text() -> None:
    assert status_code("201 Created") == 201
    assert status_code("200") == 200
    assert status_code(None) == 0
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "structure", "diagnostics": "bad status"},
        {"severity": "error", "code": "invalid", "details": {"text": "bad date"}},
    ]}
    assert outcome_text(outcome) == "bad status; bad date"
    located = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Constraint failed: ppc-1",
         "location": ["Consent", "Line[1] Col[816]"], "expression": ["Consent"]},
        {"severity": "error", "code": "required", "diagnostics": "missing", "location": ["Consent.status"]},
        {"severity": "error", "code": "invalid", "diagnostics": "only a position", "location": ["Line[1] Col[2]"]},
    ]}
    assert outcome_text(located) == ("Constraint failed: ppc-1 (at Consent); missing (at Consent.status); "
                                     "only a position")


# --- auth: none and token --------------------------------------------------------------------------


def test_auth_none_against_a_server_that_wants_a_token_fails_clearly(fhir_auth_server) -> None:
    with open_session(FhirClientConfig(fhir_auth_server.base_url)) as session:
        with pytest.raises(FhirAuthError, match="wants authentication.*FHIR_AUTH"):
            session.get(f"{fhir_auth_server.base_url}/Patient")


def test_token_from_env(fhir_auth_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_TOKEN", ACCEPTED_TOKENS[0])
    with open_session(FhirClientConfig(fhir_auth_server.base_url, auth="token")) as session:
        assert _patients_ok(session, fhir_auth_server.base_url)


def test_token_missing_names_where_to_put_it(fhir_auth_server) -> None:
    with pytest.raises(InputError, match="set FHIR_TOKEN or FHIR_TOKEN_FILE"):
        open_session(FhirClientConfig(fhir_auth_server.base_url, auth="token"))


def test_token_file_is_read_again_after_a_401(fhir_auth_server, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("expired-token\n")
    config = FhirClientConfig(fhir_auth_server.base_url, auth="token", token_file=str(token_file))
    with open_session(config) as session:
        token_file.write_text(ACCEPTED_TOKENS[1] + "\n")  # rotated by something else meanwhile
        assert _patients_ok(session, fhir_auth_server.base_url)


def test_refused_token_refreshes_once_then_fails_without_the_secret(fhir_auth_server, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_TOKEN", "wrong-token-value")
    with open_session(FhirClientConfig(fhir_auth_server.base_url, auth="token")) as session:
        statuses: list[int] = []
        session.hooks["response"].append(lambda r, *a, **k: statuses.append(r.status_code))
        with pytest.raises(FhirAuthError, match="refused the 'token' credentials.*even after a refresh") as info:
            session.get(f"{fhir_auth_server.base_url}/Patient")
    assert statuses == [401, 401]  # the request, then once more after the refresh
    assert "wrong-token-value" not in str(info.value)


# --- auth: HTTP Basic (a FaultProxy that takes only Basic, in front of the real sekmet) --------------------------

BASIC_USER, BASIC_PASSWORD = "ndop-sync", "Basic-Pa55-\u20ac"  # noqa: S105 (a test value; the euro sign is no latin-1)


@pytest.mark.parametrize("kwargs, env, message", [
    ({}, {"FHIR_PASSWORD": "x"}, "FHIR auth basic needs a user name: set FHIR_USERNAME or --fhir-username"),
    ({"username": "a:b"}, {"FHIR_PASSWORD": "x"}, "user name cannot hold ':'"),
    ({"username": "u"}, {}, "needs a password: set FHIR_PASSWORD_FILE .* or FHIR_PASSWORD"),
    ({"username": "u"}, {"FHIR_PASSWORD": "  "}, "needs a password"),
    ({"username": "u", "password_file": "/p", "base_url": "http://fhir.example.org/fhir?x=1"}, {},
     "only over https or to this machine \\(loopback\\), not to http://fhir.example.org/fhir$"),
    ({"username": "u", "password_file": "/p", "base_url": "http://10.0.0.7:8080/fhir"}, {}, "only over https"),
])
def test_basic_config_refusals_are_one_line(monkeypatch, kwargs: dict, env: dict, message: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=message) as refused:
        FhirClientConfig(**{"base_url": "https://fhir.example.org/fhir", "auth": "basic", **kwargs})
    assert "\n" not in str(refused.value)


def test_basic_config_is_accepted_over_https_or_loopback_and_holds_no_password(monkeypatch) -> None:
    monkeypatch.setenv("FHIR_PASSWORD", BASIC_PASSWORD)
    for url in ("https://fhir.example.org/fhir", "http://127.0.0.1:8080/fhir", "http://localhost/fhir",
                "http://[::1]:8080/fhir"):
        config = FhirClientConfig.from_env(env={"FHIR_URL": url, "FHIR_AUTH": "basic", "FHIR_USERNAME": "u"})
        assert (config.auth, config.username) == ("basic", "u")
        assert BASIC_PASSWORD not in repr(pickle.loads(pickle.dumps(config)))


def test_basic_password_file_must_be_private(fhir_server, tmp_path) -> None:
    secret = tmp_path / "password"
    secret.write_text(BASIC_PASSWORD + "\n")
    secret.chmod(0o640)
    config = FhirClientConfig(fhir_server, auth="basic", username=BASIC_USER, password_file=str(secret))
    with pytest.raises(InputError, match="FHIR password file must be private \\(chmod 600\\), it is 0o640") as refused:
        open_session(config)
    assert BASIC_PASSWORD not in str(refused.value)
    with pytest.raises(InputError, match="cannot read the FHIR password"):
        open_session(FhirClientConfig(fhir_server, auth="basic", username=BASIC_USER,
                                      password_file=str(tmp_path / "missing")))


def test_basic_from_a_private_file_read_again_after_a_401(fhir_server, tmp_path) -> None:
    secret = tmp_path / "password"
    secret.write_text("old-password\n")
    secret.chmod(0o600)
    with FaultProxy(fhir_server, require_basic=(BASIC_USER, BASIC_PASSWORD)) as proxy:
        config = FhirClientConfig(proxy.url, auth="basic", username=BASIC_USER, password_file=str(secret))
        with open_session(config) as session:
            secret.write_text(BASIC_PASSWORD + "\n")  # rotated by something else meanwhile
            assert _patients_ok(session, proxy.url)
        assert (proxy.refused, proxy.authorized) == (1, 1)


def test_basic_wrong_password_refreshes_once_then_fails_without_the_secret(fhir_server, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_PASSWORD", "wrong-password-value")
    with FaultProxy(fhir_server, require_basic=(BASIC_USER, BASIC_PASSWORD)) as proxy, \
            open_session(FhirClientConfig(proxy.url, auth="basic", username=BASIC_USER)) as session:
        with pytest.raises(FhirAuthError, match="refused the 'basic' credentials.*user name 'ndop-sync'.*"
                                                "FHIR_PASSWORD$") as info:
            session.get(f"{proxy.url}/Patient")
    assert (proxy.refused, proxy.authorized) == (2, 0)  # the request, then once more after the refresh
    assert "wrong-password-value" not in str(info.value)


# --- auth: client credentials ---------------------------------------------------------------------


def test_client_credentials_with_the_servers_own_token_endpoint(fhir_auth_server, monkeypatch) -> None:
    """sekmet's SMART backend-services endpoint issues a real signed token that its FHIR API checks."""
    monkeypatch.setenv("FHIR_CLIENT_SECRET", SMART_CLIENT_SECRET)
    config = FhirClientConfig(
        fhir_auth_server.base_url, auth="client-credentials", token_url=fhir_auth_server.token_url,
        client_id=SMART_CLIENT_ID, scope="system/*.*",
    )
    with open_session(config) as session:
        response = session.put(
            f"{fhir_auth_server.base_url}/Patient/cc-1",
            json={"resourceType": "Patient", "id": "cc-1"},
            headers={"Content-Type": "application/fhir+json"},
        )
        assert response.status_code in (200, 201)
        assert session.get(f"{fhir_auth_server.base_url}/Patient/cc-1").json()["id"] == "cc-1"


def test_client_credentials_secret_from_file_and_wrong_secret(fhir_auth_server, tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("not-the-secret\n")
    config = FhirClientConfig(
        fhir_auth_server.base_url, auth="client-credentials", token_url=fhir_auth_server.token_url,
        client_id=SMART_CLIENT_ID, client_secret_file=str(secret_file),
    )
    with pytest.raises(FhirAuthError, match="refused client 'ndop-sync-test': invalid_client") as info:
        open_session(config)
    assert "not-the-secret" not in str(info.value)


def test_client_credentials_token_is_cached_then_refreshed_before_expiry(fhir_auth_server, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "s")
    # expires_in 61 with a 60 s leeway: the token counts as expiring one second after it is issued.
    with TokenEndpoint(ACCEPTED_TOKENS[2:], expires_in=61, secret="s") as endpoint:
        config = FhirClientConfig(
            fhir_auth_server.base_url, auth="client-credentials", token_url=endpoint.token_url, client_id="ndop"
        )
        with open_session(config) as session:
            assert _patients_ok(session, fhir_auth_server.base_url)
            assert _patients_ok(session, fhir_auth_server.base_url)
            assert len(endpoint.issued) == 1  # cached
            time.sleep(1.2)
            assert _patients_ok(session, fhir_auth_server.base_url)
            assert len(endpoint.issued) == 2  # refreshed before the server could refuse it


def test_client_credentials_401_fetches_a_new_token_once(fhir_auth_server, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_CLIENT_SECRET", "s")
    with TokenEndpoint(["revoked-token", ACCEPTED_TOKENS[4]], secret="s") as endpoint:
        config = FhirClientConfig(
            fhir_auth_server.base_url, auth="client-credentials", token_url=endpoint.token_url, client_id="ndop"
        )
        with open_session(config) as session:
            assert _patients_ok(session, fhir_auth_server.base_url)
        assert endpoint.issued == ["revoked-token", ACCEPTED_TOKENS[4]]

    with TokenEndpoint(["revoked-token"], secret="s") as endpoint:
        config = FhirClientConfig(
            fhir_auth_server.base_url, auth="client-credentials", token_url=endpoint.token_url, client_id="ndop"
        )
        with open_session(config) as session:
            with pytest.raises(FhirAuthError, match="even after a refresh: check the client id"):
                session.get(f"{fhir_auth_server.base_url}/Patient")
        assert len(endpoint.issued) == 2  # one refresh, no loop


# --- auth: google -----------------------------------------------------------------------------------


def test_google_application_default_credentials(fhir_auth_server, tmp_path, monkeypatch) -> None:
    """A service-account key file (made here) whose token_uri is a local endpoint; the token goes to sekmet."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with TokenEndpoint([ACCEPTED_TOKENS[5]]) as endpoint:
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps({
            "type": "service_account", "project_id": "ndop-test", "private_key_id": "k1", "private_key": pem,
            "client_email": "ndop@ndop-test.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": endpoint.token_url,
        }))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        with open_session(FhirClientConfig(fhir_auth_server.base_url, auth="google")) as session:
            assert _patients_ok(session, fhir_auth_server.base_url)
        assert endpoint.issued == [ACCEPTED_TOKENS[5]]


# --- retries and search -------------------------------------------------------------------------------


def test_429_retry_after_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    def script(index: int, seen) -> Reply:
        if index == 0:
            return Reply(429, {"resourceType": "OperationOutcome", "issue": []}, {"Retry-After": "1"})
        return Reply(200, {"resourceType": "Bundle", "type": "searchset", "entry": []})

    with StubServer(script) as stub:
        with open_session(FhirClientConfig(stub.url, backoff=0.01)) as session:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="pipeline.fhir"):
                assert list(iter_search(session, stub.url, "Consent", {"identifier": "x|9990000018"})) == []
            elapsed = time.monotonic() - started
    assert len(stub.seen) == 2
    assert elapsed >= 0.9
    assert "HTTP 429" in caplog.text and "Retry-After 1" in caplog.text
    assert "9990000018" not in caplog.text  # the query is never logged


def test_failed_search_raises_with_the_outcome_text() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                              "diagnostics": "unknown parameter foo"}]}
    with StubServer(lambda i, s: Reply(400, outcome)) as stub:
        with open_session(FhirClientConfig(stub.url)) as session:
            with pytest.raises(FhirError, match="HTTP 400: unknown parameter foo"):
                list(iter_search(session, stub.url, "Consent", {"foo": "1"}))


def test_unreachable_server_is_one_clear_fhir_error() -> None:
    """``ndop run --cohort fhir`` with the FHIR server down: a one-line error, not a requests traceback."""
    from dev.service import free_port

    base = f"http://127.0.0.1:{free_port()}/fhir"
    with open_session(FhirClientConfig(base, max_retries=2, backoff=0)) as session:
        with pytest.raises(FhirError, match=rf"^search Patient failed: no answer from the FHIR server {base}/Patient "
                                            r"\(ConnectionError\)$"):
            list(iter_search(session, base, "Patient", {"_elements": "identifier"}))
        with pytest.raises(FhirError, match=r"^count Consent failed: no answer"):
            search_total(session, base, "Consent", {})


def test_retry_warnings_count_up_to_the_configured_retries(caplog: pytest.LogCaptureFixture) -> None:
    from dev.service import free_port

    base = f"http://127.0.0.1:{free_port()}/fhir"
    with open_session(FhirClientConfig(base, max_retries=3, connect_retries=3, backoff=0)) as session:
        with caplog.at_level(logging.WARNING, logger="pipeline.fhir"), pytest.raises(FhirError):
            search_total(session, base, "Consent", {})
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert [m.split("; ")[1].split(",")[0] for m in retries] == ["retry 1 of 3", "retry 2 of 3", "retry 3 of 3"]
    caplog.clear()
    with open_session(FhirClientConfig(base, max_retries=5, backoff=0)) as session:  # connect_retries: 2
        with caplog.at_level(logging.WARNING, logger="pipeline.fhir"), pytest.raises(FhirError):
            search_total(session, base, "Consent", {})
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert [m.split("; ")[1].split(",")[0] for m in retries] == ["retry 1 of 2", "retry 2 of 2"]


def test_iter_search_follows_next_links(fhir_store: str) -> None:
    fhir_server = fhir_store
    numbers = nhs.synthetic_numbers(25, seed=51).to_pylist()
    with open_session(FhirClientConfig(fhir_server)) as session:
        for i, number in enumerate(numbers):
            response = session.put(
                f"{fhir_server}/Patient/paging-{i}",
                json={"resourceType": "Patient", "id": f"paging-{i}", "identifier": [
                    {"system": nhs.NHS_NUMBER_SYSTEM, "value": number}], "gender": "unknown"},
                headers={"Content-Type": "application/fhir+json"},
            )
            assert response.status_code in (200, 201)
        pages: list[str] = []
        session.hooks["response"].append(lambda r, *a, **k: pages.append(r.url))
        found = list(iter_search(session, fhir_server, "Patient",
                                 {"gender": "unknown", "_count": 10, "_elements": "identifier"}))
        assert sorted(p["identifier"][0]["value"] for p in found) == sorted(numbers)
        assert len(pages) == 3
        assert search_total(session, fhir_server, "Patient", {"gender": "unknown"}) == 25
