"""Reading the FHIR store: a search page (one clear line when it fails), every page of a search (paging links
followed only on the base URL's origin), a count, the server check, and posting a Bundle."""
from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urljoin, urlsplit

import requests

from pipeline.fhir.answers import FHIR_JSON, FhirError, answer_problem, encode, response_reason
from pipeline.fhir.config import FhirClientConfig, origin, url_without_query
from pipeline.fhir.sessions import open_session

_LOGGER = logging.getLogger(__name__)


def get_page(session: requests.Session, url: str, params: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """GET a search page; a server that never answers (after the session's retries) is one FhirError line."""
    try:
        response = session.get(url, params=params)
    except requests.RequestException as exc:
        raise FhirError(f"{what} failed: no answer from the FHIR server {url_without_query(url)} "
                        f"({type(exc).__name__})") from None
    if response.status_code != 200:
        raise FhirError(f"{what} failed: HTTP {response.status_code}: {response_reason(response)}")
    return response.json()


def check_server(config: FhirClientConfig) -> None:
    """Fail fast, before a pipeline posts anything: a server that is down (or refuses our credentials)
    would otherwise cost every bundle its whole retry budget before the run could fail."""
    with open_session(config) as session:
        get_page(session, f"{config.base_url.rstrip('/')}/metadata", None, "FHIR server check")


# ---------------------------------------------------------------------------------------------------
# Search and bundles


def iter_search(
    session: requests.Session, base_url: str, resource_type: str, params: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Every resource a search matches, page after page (following ``link[relation=next]``)."""
    url: str | None = f"{base_url.rstrip('/')}/{resource_type}"
    query: Mapping[str, Any] | None = params
    pages = 0
    while url:
        bundle = get_page(session, url, query, f"search {resource_type}")
        pages += 1
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource")
            if resource and entry.get("search", {}).get("mode", "match") == "match":
                yield resource
        link = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
        url = _next_page(url, str(link), base_url, resource_type) if link else None
        query = None  # the next link carries the whole query
    _LOGGER.debug("search %s: %d pages", resource_type, pages)


def _next_page(page: str, link: str, base_url: str, resource_type: str) -> str:
    """The next page's URL (a relative link resolved against the page), only on the base URL's origin: the
    session sends its credentials (a bearer token) with every request, so a link elsewhere stops the read with
    one line naming that origin (never the link's path or query, which may carry a paging token)."""
    target = urljoin(page, link)
    if origin(target) != origin(base_url) or "@" in urlsplit(target).netloc:
        raise FhirError(
            f"search {resource_type}: the server's next-page link leads to {origin(target)}, not the FHIR base "
            f"URL's origin {origin(base_url)}: paging stopped so no credential is sent there (the FHIR server's "
            "own base address must be the one ndop uses)")
    return target


def search_total(session: requests.Session, base_url: str, resource_type: str, params: Mapping[str, Any]) -> int:
    """How many resources match (``_summary=count``)."""
    bundle = get_page(session, f"{base_url.rstrip('/')}/{resource_type}", {**params, "_summary": "count"},
                  f"count {resource_type}")
    return int(bundle.get("total", 0))


def post_bundle(session: requests.Session, base_url: str, bundle: Mapping[str, Any]) -> requests.Response:
    """POST a batch/transaction Bundle to the base; retries are the session's."""
    return session.post(base_url, data=encode(bundle), headers={"Content-Type": FHIR_JSON})


def post_batch(session: requests.Session, base_url: str, entries: Sequence[Mapping[str, Any]],
               what: str) -> list[dict[str, Any]]:
    """POST a ``batch`` Bundle of ``entries``; the answer's entries, one per entry sent, when the store answered
    entry by entry (:func:`~pipeline.fhir.answers.answer_problem`), else one :class:`FhirError` line saying
    ``what`` failed."""
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": list(entries)}
    with post_bundle(session, base_url, bundle) as response:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        problem = answer_problem(response.status_code, body, "batch", len(bundle["entry"]))
    if problem is not None:
        raise FhirError(f"{what} at {base_url} failed: {problem}")
    return list(body["entry"])
