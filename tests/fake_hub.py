"""A model hub on 127.0.0.1 for the hub-loading tests: the endpoints ``huggingface_hub.snapshot_download`` uses.

``FakeHub()`` serves, from a thread, ``repos[repo_id] = {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}``:

* ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings": [{"rfilename"}]}`` (``HfApi.repo_info``);
* ``GET /api/models/{repo}/tree/{rev}``: one page of ``{"type": "file", "path", "size", "oid"}`` (``list_repo_tree``);
* ``HEAD`` and ``GET /{repo}/resolve/{rev}/{path}``: the bytes, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (``hf_hub_download``).

A branch name or a commit sha names a revision.  Unknown repo, revision or file: 404 with ``X-Error-Code``
``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``, as the hub answers, which huggingface_hub turns into
its error classes.  ``requests`` lists the ``(method, path)`` of every request, ``downloads`` the ``(repo, path)`` of every ``GET`` of a file; ``url`` is the endpoint;
``stop()`` shuts the server (later requests are refused).
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def commit_sha(files: dict[str, bytes]) -> str:
    """A 40-hex commit id derived from the files (what huggingface_hub takes for a commit hash)."""
    h = hashlib.sha1()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return h.hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.downloads: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit ``files`` to ``repo_id`` on ``branch``; returns the commit sha."""
        sha = commit_sha(files)
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][sha] = dict(files)
        repo["refs"][branch] = sha
        return sha

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((req.command, req.path))
        parts = [unquote(p) for p in urlsplit(req.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            files, sha = self._lookup(req, repo_id, rev)
            if files is None:
                return
            if kind == "revision":
                data = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]}
            else:
                data = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for p, b in sorted(files.items())]
            self._send(req, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files, sha = self._lookup(req, repo_id, rev)
            if files is None:
                return
            if path not in files:
                return self._error(req, "EntryNotFound", {"X-Repo-Commit": sha})
            data = files[path]
            if body:
                self.downloads.append((repo_id, path))
            self._send(req, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                        "Content-Type": "application/octet-stream"}, body)
        else:
            self._error(req, "RepoNotFound")

    def _lookup(self, req, repo_id: str, rev: str):
        """(files, sha) of ``repo_id`` at ``rev``, or (None, None) after answering 404."""
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(req, "RepoNotFound")
            return None, None
        sha = repo["refs"].get(rev, rev)
        if sha not in repo["commits"]:
            self._error(req, "RevisionNotFound")
            return None, None
        return repo["commits"][sha], sha

    def _error(self, req, code: str, headers: dict | None = None) -> None:
        message = {"RepoNotFound": "Repository not found", "RevisionNotFound": "Invalid rev id",
                   "EntryNotFound": "Entry not found"}[code]
        self._send(req, 404, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                    **(headers or {})}, True)

    @staticmethod
    def _send(req, status: int, data: bytes, headers: dict, body: bool) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body and req.command != "HEAD":
            req.wfile.write(data)
