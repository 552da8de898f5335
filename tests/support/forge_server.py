"""A local stand-in for the GitHub and GitLab REST APIs (stdlib ``http.server`` in a thread).

It answers only the requests the providers document for what reconciler does (issue comments
and statuses on GitHub, merge request notes and statuses on GitLab), with the documented
methods, paths, headers and JSON bodies; anything else is answered 404/400/401 and recorded,
so a test sees exactly what the client sent. Comments live in memory and are paginated with a
``Link: <...>; rel="next"`` header like the real APIs (``page_size`` forces small pages).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support.receiver import reply, serve, stop

GITHUB_STATES = {"pending", "success", "failure", "error"}
GITLAB_STATES = {"pending", "running", "success", "failed", "canceled", "skipped"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeForge:
    provider: str  # "github" | "gitlab"
    token: str
    prefix: str = ""  # "/api/v3" (GitHub Enterprise), "/api/v4" (GitLab)
    page_size: int = 100
    requests: list[Request] = field(default_factory=list)
    comments: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # pr -> comments
    statuses: list[dict[str, Any]] = field(default_factory=list)
    foreign: set[int] = field(default_factory=set)  # comment ids the token may not edit
    redirect_to: str | None = None  # answer every request with a 302 there
    _next_id: int = 1000
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.prefix}"

    def __enter__(self) -> FakeForge:
        self._server = serve(self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        stop(self._server)

    def add_comment(self, pr: int, body: str, *, foreign: bool = False) -> int:
        self._next_id += 1
        self.comments.setdefault(pr, []).append({"id": self._next_id, "body": body})
        if foreign:
            self.foreign.add(self._next_id)
        return self._next_id

    # ---------------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        request = Request(
            h.command,
            parts.path,
            dict(urllib.parse.parse_qsl(parts.query)),
            {k.lower(): v for k, v in h.headers.items()},
            body,
        )
        self.requests.append(request)
        if self.redirect_to is not None:
            return reply(h, 302, b"", {"Location": self.redirect_to})
        if not request.path.startswith(self.prefix):
            return _reply(h, 404, {"message": "Not Found"})
        path = request.path[len(self.prefix) :]
        if raw and request.headers.get("content-type") != "application/json":
            return _reply(h, 415, {"message": "Unsupported Media Type"})
        if self.provider == "github":
            self._github(h, request, path)
        else:
            self._gitlab(h, request, path)
        return None

    def _github(self, h: BaseHTTPRequestHandler, r: Request, path: str) -> None:
        if r.headers.get("authorization") != f"Bearer {self.token}":
            return _reply(h, 401, {"message": "Bad credentials"})
        if r.headers.get("accept") != "application/vnd.github+json" or not r.headers.get(
            "x-github-api-version"
        ):
            return _reply(h, 400, {"message": "missing Accept or X-GitHub-Api-Version"})
        if m := re.fullmatch(r"/repos/([^/]+)/([^/]+)/statuses/([0-9a-f]{40})", path):
            if r.method != "POST" or not isinstance(r.body, dict):
                return _reply(h, 404, {"message": "Not Found"})
            if r.body.get("state") not in GITHUB_STATES or len(r.body.get("description", "")) > 140:
                return _reply(h, 422, {"message": "Validation Failed"})
            self.statuses.append({"repo": f"{m[1]}/{m[2]}", "sha": m[3], **r.body})
            return _reply(h, 201, {"id": len(self.statuses), **r.body})
        if m := re.fullmatch(r"/repos/([^/]+)/([^/]+)/issues/([0-9]+)/comments", path):
            pr = int(m[3])
            if r.method == "GET":
                return self._page(h, r, self.comments.get(pr, []))
            if r.method == "POST" and _has_body(r):
                self._next_id += 1
                comment = {"id": self._next_id, "body": r.body["body"]}
                self.comments.setdefault(pr, []).append(comment)
                return _reply(h, 201, comment)
        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)/issues/comments/([0-9]+)", path)
        if m and r.method == "PATCH" and _has_body(r):
            return self._edit(h, int(m[3]), r.body["body"])
        return _reply(h, 404, {"message": "Not Found"})

    def _gitlab(self, h: BaseHTTPRequestHandler, r: Request, path: str) -> None:
        if r.headers.get("private-token") != self.token:
            return _reply(h, 401, {"message": "401 Unauthorized"})
        if m := re.fullmatch(r"/projects/([^/]+)/statuses/([0-9a-f]{40})", path):
            if r.method != "POST" or not isinstance(r.body, dict):
                return _reply(h, 404, {"message": "404 Not Found"})
            if r.body.get("state") not in GITLAB_STATES:
                return _reply(h, 400, {"message": "state is invalid"})
            self.statuses.append({"project": m[1], "sha": m[2], **r.body})
            return _reply(h, 201, {"id": len(self.statuses), **r.body})
        if m := re.fullmatch(r"/projects/([^/]+)/merge_requests/([0-9]+)/notes", path):
            mr = int(m[2])
            if r.method == "GET":
                return self._page(h, r, self.comments.get(mr, []))
            if r.method == "POST" and _has_body(r):
                self._next_id += 1
                note = {"id": self._next_id, "body": r.body["body"], "system": False}
                self.comments.setdefault(mr, []).append(note)
                return _reply(h, 201, note)
        m = re.fullmatch(r"/projects/([^/]+)/merge_requests/([0-9]+)/notes/([0-9]+)", path)
        if m and r.method == "PUT" and _has_body(r):
            return self._edit(h, int(m[3]), r.body["body"])
        return _reply(h, 404, {"message": "404 Not Found"})

    def _page(self, h: BaseHTTPRequestHandler, r: Request, items: list[dict[str, Any]]) -> None:
        size = min(int(r.query.get("per_page", "30")), self.page_size)
        page = int(r.query.get("page", "1"))
        chunk = items[(page - 1) * size : page * size]
        link = None
        if page * size < len(items):
            query = dict(r.query, page=str(page + 1))
            next_url = f"{self.url}{r.path[len(self.prefix) :]}?{urllib.parse.urlencode(query)}"
            link = f'<{next_url}>; rel="next"'
        _reply(h, 200, chunk, link=link)

    def _edit(self, h: BaseHTTPRequestHandler, comment_id: int, body: str) -> None:
        for comments in self.comments.values():
            for comment in comments:
                if comment["id"] == comment_id:
                    if comment_id in self.foreign:
                        return _reply(h, 403, {"message": "Forbidden"})
                    comment["body"] = body
                    return _reply(h, 200, comment)
        _reply(h, 404, {"message": "Not Found"})
        return None


def _has_body(r: Request) -> bool:
    return isinstance(r.body, dict) and set(r.body) == {"body"} and isinstance(r.body["body"], str)


def _reply(h: BaseHTTPRequestHandler, status: int, data: Any, link: str | None = None) -> None:
    reply(h, status, json.dumps(data).encode(), {"Link": link} if link else {})
