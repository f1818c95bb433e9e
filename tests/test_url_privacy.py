"""Issue 21 items 3 and 4: no credential in a FHIR URL (refused, never stored in ledger.json, never printed), and a
paging link is followed only on the FHIR base URL's origin (a bearer token, or FHIR_AUTH=basic's Authorization
header, never reaches another server; nor does a bulk import's job status URL lead elsewhere)."""
from __future__ import annotations

import json

import pytest
import requests

from pipeline.ledger import versions as ledger_dirs
from pipeline.core import nhs
from pipeline.core.errors import InputError, NdopError
from pipeline.fhir.answers import FhirError
from pipeline.fhir.bulk_import import HapiImport
from pipeline.fhir.config import FhirClientConfig, origin, same_base_url, without_userinfo
from pipeline.fhir.search import iter_search
from pipeline.fhir.sessions import open_session
from tests.fixtures.fhir import ACCEPTED_TOKENS
from tests.fixtures.fhir_proxy import FaultProxy, HeaderRecorder
from tests.fixtures.http_stub import Reply, StubServer
from tests.helpers import TEST_KEY, cli
from tests.test_run import ndop_run

PASSWORD = "s3cret-Pa55"  # noqa: S105 (a test value)


def _with_userinfo(url: str, password: str = PASSWORD) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://ndop:{password}@{rest}"


# --- item 3: user:password@ ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["verify"], ["process", "--request-id", "r1"], ["run", "--cohort", "x.txt"]])
@pytest.mark.parametrize("where", ["option", "env"])
def test_a_fhir_url_with_userinfo_is_refused_in_one_line_exit_2(tmp_path, command, where) -> None:
    url = _with_userinfo("https://fhir.example.org/fhir")
    args = [*command, "--work-dir", str(tmp_path / "work")]
    result = (cli(*args, "--fhir-url", url, drop_fhir=True) if where == "option"
              else cli(*args, env={"FHIR_URL": url}, drop_fhir=True))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert PASSWORD not in result.stdout + result.stderr and "ndop:" not in lines[0].split("error:", 1)[1]
    assert "https://fhir.example.org/fhir" in lines[0] and "FHIR_AUTH" in lines[0]
    assert "FHIR_AUTH=basic with FHIR_USERNAME and FHIR_PASSWORD_FILE" in lines[0]  # the way in for a Basic store
    assert ("--fhir-url" if where == "option" else "FHIR_URL") in lines[0]
    assert not (tmp_path / "work" / "requests").exists()  # refused before anything was built
    audit = (tmp_path / "work" / "audit.jsonl")
    assert not audit.exists() or PASSWORD not in audit.read_text()


def test_config_refuses_userinfo_however_it_is_built() -> None:
    for url in (_with_userinfo("http://127.0.0.1:8080/fhir"), "http://user@127.0.0.1:8080/fhir"):
        with pytest.raises(InputError) as refused:
            FhirClientConfig(url)
        assert PASSWORD not in str(refused.value) and "http://127.0.0.1:8080/fhir" in str(refused.value)
        with pytest.raises(InputError):
            FhirClientConfig.from_env(env={"FHIR_URL": url})
    with pytest.raises(InputError, match="FHIR_TOKEN_URL: the token endpoint URL https://login.example.org/t") as t:
        FhirClientConfig("https://h/fhir", auth="client-credentials", client_id="c",
                         token_url=_with_userinfo("https://login.example.org/t"))
    assert PASSWORD not in str(t.value)


def test_urls_compare_and_print_without_userinfo() -> None:
    assert without_userinfo(_with_userinfo("https://h:8443/fhir?x=1")) == "https://h:8443/fhir?x=1"
    assert without_userinfo("https://h/fhir") == "https://h/fhir"
    assert same_base_url(_with_userinfo("https://h/fhir/"), _with_userinfo("https://h/fhir", "new-password"))
    assert not same_base_url(_with_userinfo("https://h/fhir"), "https://other/fhir")


def test_an_old_ledger_with_userinfo_compares_equal_and_never_prints_it(tmp_path) -> None:
    folder = tmp_path / "v-old"
    folder.mkdir()
    (folder / ledger_dirs.META).write_text(json.dumps({"fhir_base_url": _with_userinfo("http://127.0.0.1:9/fhir"),
                                                       "files": [], "sha256": {},
                                                       ledger_dirs.KEY_FINGERPRINT: TEST_KEY.fingerprint}))
    assert ledger_dirs.check_ledger(str(folder), "http://127.0.0.1:9/fhir/", TEST_KEY.fingerprint) == str(folder)
    with pytest.raises(InputError) as other:
        ledger_dirs.check_ledger(str(folder), "http://127.0.0.1:10/fhir", TEST_KEY.fingerprint)
    assert PASSWORD not in str(other.value) and "http://127.0.0.1:9/fhir" in str(other.value)
    new = tmp_path / "v-new"
    new.mkdir()
    ledger_dirs.finish(str(new), {"counts": {}}, _with_userinfo("http://127.0.0.1:9/fhir"), TEST_KEY.fingerprint)
    assert PASSWORD not in (new / ledger_dirs.META).read_text()


def test_a_ledger_written_with_userinfo_keeps_working_after_the_password_is_removed(
        tmp_path, work_dir, mesh, fhir_server) -> None:
    """Old main stored ``user:password@`` in ledger.json; after upgrading (URL without it) the next run and
    ``ndop verify`` use that ledger as it is, print no password, and the new ledger.json holds none."""
    numbers = nhs.synthetic_numbers(30, seed=2103).to_pylist()
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(numbers) + "\n")
    mesh.plugin()
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    assert ndop_run(work_dir, env, "--cohort", str(cohort)).returncode == 0
    meta_path = ledger_dirs.current(work_dir).resolve() / ledger_dirs.META  # type: ignore[union-attr]
    meta = json.loads(meta_path.read_text())
    meta["fhir_base_url"] = _with_userinfo(fhir_server)  # as old main wrote it for FHIR_URL=http://u:p@...
    meta_path.write_text(json.dumps(meta))

    verified = cli("verify", "--work-dir", str(work_dir.root), env=env)
    assert verified.returncode == 0 and "verified 30 Consents: 0 differ" in verified.stdout, verified.stderr
    again = ndop_run(work_dir, env, "--cohort", str(cohort), "--new-request")
    assert again.returncode == 0, again.stderr
    assert PASSWORD not in verified.stdout + verified.stderr + again.stdout + again.stderr
    report = json.loads((work_dir.request_dir(work_dir.all()[-1]["request_id"]) / "report.json").read_text())
    assert report["changes"]["new_patients"] == 0  # the old ledger was read, not a full refresh
    new_meta = (ledger_dirs.current(work_dir).resolve() / ledger_dirs.META).read_text()  # type: ignore[union-attr]
    assert PASSWORD not in new_meta and json.loads(new_meta)["fhir_base_url"] == fhir_server


# --- item 4: paging links stay on the base URL's origin ------------------------------------------------

TOKEN = ACCEPTED_TOKENS[4]
FAMILY = "PagingOrigin21"


def _put_patients(base_url: str, family: str, seed: int, headers: dict[str, str] | None = None) -> list[str]:
    """25 Patients of ``family`` (three pages of 10), put straight into the server at ``base_url``."""
    numbers = nhs.synthetic_numbers(25, seed=seed).to_pylist()
    for i, number in enumerate(numbers):
        response = requests.put(
            f"{base_url}/Patient/{family.lower()}-{i}", timeout=30,
            json={"resourceType": "Patient", "id": f"{family.lower()}-{i}", "name": [{"family": family}],
                  "identifier": [{"system": nhs.NHS_NUMBER_SYSTEM, "value": number}]},
            headers={"Content-Type": "application/fhir+json", **(headers or {})})
        assert response.status_code in (200, 201), response.text
    return numbers


@pytest.fixture(scope="module")
def patients(fhir_auth_server) -> list[str]:
    """25 Patients in the sekmet that wants a bearer token."""
    return _put_patients(fhir_auth_server.base_url, FAMILY, 2104, {"Authorization": f"Bearer {TOKEN}"})


def test_origin_is_scheme_host_and_port() -> None:
    assert origin("https://Fhir.Example.org/fhir?_getpages=x") == "https://fhir.example.org:443"
    assert origin("http://user:pw@127.0.0.1:8080/fhir") == "http://127.0.0.1:8080"
    assert origin("https://h/fhir") != origin("http://h/fhir") != origin("http://h:8080/fhir")


def test_next_links_on_the_base_origin_are_followed(fhir_auth_server, patients, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_TOKEN", TOKEN)
    with FaultProxy(fhir_auth_server.base_url) as proxy, \
            open_session(FhirClientConfig(proxy.url, auth="token")) as session:
        pages: list[str] = []
        session.hooks["response"].append(lambda r, *a, **k: pages.append(r.url))
        found = list(iter_search(session, proxy.url, "Patient", {"family": FAMILY, "_count": 10}))
    assert sorted(p["identifier"][0]["value"] for p in found) == sorted(patients)
    assert len(pages) == 3 and all(origin(p) == origin(proxy.url) for p in pages)


def test_a_next_link_to_another_origin_stops_the_read_and_gets_no_token(fhir_auth_server, patients,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv("FHIR_TOKEN", TOKEN)
    with FaultProxy(fhir_auth_server.base_url) as proxy, HeaderRecorder() as elsewhere, \
            open_session(FhirClientConfig(proxy.url, auth="token")) as session:
        proxy.link_origin = elsewhere.url
        with pytest.raises(FhirError) as stopped:
            list(iter_search(session, proxy.url, "Patient", {"family": FAMILY, "_count": 10}))
    message = str(stopped.value)
    assert elsewhere.requests == []  # old main: the next page was fetched there, with "Authorization: Bearer ..."
    assert origin(elsewhere.url) in message and origin(proxy.url) in message
    assert TOKEN not in message and "_getpages" not in message and "?" not in message


def test_ndop_run_cohort_fhir_with_a_foreign_next_link_fails_in_one_line(tmp_path, work_dir, mesh, fhir_auth_server,
                                                                           patients) -> None:
    mesh.plugin()
    with FaultProxy(fhir_auth_server.base_url) as proxy, HeaderRecorder() as elsewhere:
        proxy.link_origin = elsewhere.url
        env = {**mesh.env(), "FHIR_URL": proxy.url, "FHIR_AUTH": "token", "FHIR_TOKEN": TOKEN}
        result = ndop_run(work_dir, env, "--cohort", "fhir")
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stdout + result.stderr
    assert origin(elsewhere.url) in errors[0] and "next-page link" in errors[0]
    assert elsewhere.requests == [] and TOKEN not in result.stdout + result.stderr
    assert not any(work_dir.all())  # no request built from a cohort read only in part


BASIC = ("ndop-basic", "Basic-Pa55-21")
BASIC_FAMILY = "PagingOriginBasic"


@pytest.fixture(scope="module")
def basic_patients(fhir_server) -> list[str]:
    """25 Patients in the open sekmet, reached through a FaultProxy that takes only HTTP Basic."""
    return _put_patients(fhir_server, BASIC_FAMILY, 2105)


def test_basic_next_links_on_the_base_origin_are_followed_and_a_foreign_one_gets_no_header(
        fhir_server, basic_patients, monkeypatch) -> None:
    monkeypatch.setenv("FHIR_PASSWORD", BASIC[1])
    with FaultProxy(fhir_server, require_basic=BASIC) as proxy, HeaderRecorder() as elsewhere, \
            open_session(FhirClientConfig(proxy.url, auth="basic", username=BASIC[0])) as session:
        found = list(iter_search(session, proxy.url, "Patient", {"family": BASIC_FAMILY, "_count": 10}))
        assert sorted(p["identifier"][0]["value"] for p in found) == sorted(basic_patients)
        assert (proxy.refused, proxy.authorized) == (0, 3)
        proxy.link_origin = elsewhere.url
        with pytest.raises(FhirError) as stopped:
            list(iter_search(session, proxy.url, "Patient", {"family": BASIC_FAMILY, "_count": 10}))
    assert elsewhere.requests == []  # the Basic header (the password, base64) never went there
    assert origin(elsewhere.url) in str(stopped.value) and BASIC[1] not in str(stopped.value)


def test_a_bulk_import_status_url_on_another_origin_is_refused_and_gets_no_basic_header(monkeypatch) -> None:
    """HAPI's $import answers with the job's status URL (Content-Location); one on another origin is refused before
    it is polled, so the session's Basic header never goes there."""
    monkeypatch.setenv("FHIR_PASSWORD", BASIC[1])
    with HeaderRecorder() as elsewhere:
        with StubServer(lambda i, seen: Reply(202, {}, {"Content-Location": f"{elsewhere.url}/fhir/$import-poll/1"})
                        ) as store, \
                open_session(FhirClientConfig(store.url, auth="basic", username=BASIC[0])) as session:
            with pytest.raises(NdopError, match="job status URL is on http://127.0.0.1:.*not the FHIR base URL"):
                HapiImport(session, store.url).start({"Consent": ["http://127.0.0.1:1/consent-1.ndjson"]})
        assert [seen.headers.get("Authorization", "")[:6] for seen in store.seen] == ["Basic "]  # it went to the store
    assert elsewhere.requests == []


@pytest.mark.parametrize("auth", ["token", "basic"])
def test_a_redirect_to_another_origin_carries_no_token(monkeypatch, auth: str) -> None:
    """The other way a request leaves the origin: requests drops Authorization on a cross-origin redirect (checked
    here for our token and Basic sessions, whose credential is a session header; this held before issue 21 too)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("FHIR_TOKEN", TOKEN)
    monkeypatch.setenv("FHIR_PASSWORD", BASIC[1])
    with HeaderRecorder() as elsewhere:
        class Redirect(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(302)
                self.send_header("Location", f"{elsewhere.url}/fhir/Patient?page=2")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            base = f"http://127.0.0.1:{server.server_port}/fhir"
            with open_session(FhirClientConfig(base, auth=auth, username=BASIC[0])) as session:
                assert "Authorization" in session.headers
                list(iter_search(session, base, "Patient"))
        finally:
            server.shutdown()
            server.server_close()
    assert [path for _m, path, _h in elsewhere.requests] == ["/fhir/Patient?page=2"]
    assert not any("Authorization" in headers or TOKEN in str(headers) or "Basic" in str(headers)
                   for _m, _p, headers in elsewhere.requests)
