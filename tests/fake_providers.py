"""Local fake RunPod (REST v2) and Lambda Cloud (API v1) servers, answering in the shapes providers.md documents.

Each fake is a ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread; use it as a context
manager or through the `fake_runpod` / `fake_lambda` fixtures, which also point ftl's env overrides
(FTL_RUNPOD_API_URL / FTL_LAMBDA_API_URL, RUNPOD_API_KEY / LAMBDA_API_KEY) at it.

What they check: the bearer key (401 in the provider's error shape otherwise), required and unknown
request fields (RunPod: 422 schema / 400 cross-field problem+json; Lambda: 400 global/invalid-parameters).
What they keep: instances in memory, pending -> running after `ready_after_polls` GETs of the instance
(or `ready_after_s` seconds). Test knobs:

* `fail_next(status, n=1, path_prefix=None, retry_after=0)`: the next n matching requests fail (429s carry Retry-After);
* `no_capacity = True`: creates answer the documented no-capacity error (RunPod: a 400 in the wording
  `capacity_detail`, one of RUNPOD_NO_CAPACITY_WORDINGS); RunPod `refuse[(gpu id, data center, cloud)] =
  (status, detail)`: that one candidate's answer;
* `never_ready = True`: instances stay pending;
* `on_create(instance_view) -> dict | None`: return {"ssh_host", "ssh_port", "private_ip"} to point the
  reported SSH endpoint at a real sshd (default 127.0.0.1:22, private IP 127.0.0.1);
* `running()`: public views of the instances not terminated; `requests`: what came in (auth value removed).

Every answer, and every request body a client sends, is checked against the provider's OpenAPI document
(tests/providers_openapi/, via tests/openapi_check.py); leaving the `with` block fails the test on any
mismatch. Where the documents are silent the fakes answer in several plausible forms: RunPod's capacity
wording, Lambda's 429 (with or without Retry-After, with or without a body), Lambda's `private_ip` (an
optional field: `omit_private_ip`), the names RunPod gives cluster member pods, and 404 for a pod or
instance once deleted.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.openapi_check import document

RUNPOD_KEY = "rpa_FAKE0runpod0secret0key0123456789"
LAMBDA_KEY = "secret_FAKE0lambda0key0abcdef0123456789"
# RunPod's document says a capacity failure is a 400 whose `detail` is human text ("this GPU and data center
# combination could not be placed") and gives no wording: the fake answers in any of these (capacity_detail)
RUNPOD_NO_CAPACITY_WORDINGS = (
    "GPU type {gpu} could not be placed in the requested data centers.",
    "There are no longer any instances available with the requested specifications. Please refresh and try again.",
    "This machine does not have the resources to deploy your pod. Please try a different machine.",
)
RUNPOD_NO_CAPACITY = RUNPOD_NO_CAPACITY_WORDINGS[0]

Reply = tuple[int, Any, dict[str, str]]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Fake:
    """Server plumbing shared by both fakes: auth, request log, fault injection, lifecycle."""

    default_key = ""
    provider = ""  # whose OpenAPI document (tests/providers_openapi/) every request and answer is checked against

    def __init__(self, key: str | None = None, ready_after_polls: int = 2, ready_after_s: float | None = None):
        self.key = key or self.default_key
        self.ready_after_polls, self.ready_after_s = ready_after_polls, ready_after_s
        self.no_capacity = False
        self.never_ready = False
        self.on_create: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.requests: list[dict[str, Any]] = []
        self.crashes: list[str] = []
        self.request_problems: list[str] = []  # client bodies the document refuses
        self.response_problems: list[str] = []  # answers of this fake the document refuses (a fake bug)
        self.check_requests = True  # False in a test that sends bad bodies on purpose
        self.instances: dict[str, dict[str, Any]] = {}  # id -> record (internal; views are built per answer)
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- lifecycle of the server -----------------------------------------------------------------

    def start(self) -> "_Fake":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # answers are small: no Nagle wait between header and body writes
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *a: Any) -> None:
                pass

            def _any(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "_Fake":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if exc[0] is None:
            self.assert_documented()

    def assert_documented(self) -> None:
        """Every answer was one the provider's document allows, and so was every request body a client sent."""
        assert not self.response_problems, "the fake answered outside its document:\n" + "\n".join(self.response_problems)
        if self.check_requests:
            assert not self.request_problems, "a client sent what the document refuses:\n" + "\n".join(self.request_problems)

    # --- test knobs ------------------------------------------------------------------------------

    def fail_next(self, status_code: int, n: int = 1, path_prefix: str | None = None,
                  retry_after: float | None = None, message: str | None = None, empty: bool = False,
                  method: str | None = None) -> None:
        """The next n requests whose path starts with path_prefix (any, if None), of `method` (any, if None),
        answer status_code.

        429s: RunPod documents Retry-After (0 unless given); Lambda documents none, so its 429 carries one only
        when retry_after is given. empty: no body at all (what a proxy in front of the API may send)."""
        with self._lock:
            self._faults += [{"status": status_code, "prefix": path_prefix, "retry_after": retry_after,
                              "message": message, "empty": empty,
                              "method": method}] * n

    def running(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self.view(r) for r in self.instances.values() if not r["terminated"]]

    # --- per-provider hooks ----------------------------------------------------------------------

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Reply:
        raise NotImplementedError

    def error(self, status: int, message: str, code: str | None = None, errors: list[str] | None = None) -> Reply:
        raise NotImplementedError

    def authorized(self, header: str) -> bool:
        return header == f"Bearer {self.key}"

    def extra_headers(self) -> dict[str, str]:
        return {}

    # --- helpers for subclasses ------------------------------------------------------------------

    def _new_record(self, **fields: Any) -> dict[str, Any]:
        rec = {"polls": 0, "born": time.monotonic(), "terminated": False, "ssh_host": "127.0.0.1", "ssh_port": 22,
               "private_ip": "127.0.0.1", "created_at": _now(), **fields}
        self.instances[rec["id"]] = rec
        return rec

    def _hook(self, rec: dict[str, Any]) -> None:
        if self.on_create:
            got = self.on_create(self.view(rec)) or {}
            for k in ("ssh_host", "ssh_port", "private_ip"):
                if k in got:
                    rec[k] = got[k]

    def _poll(self, rec: dict[str, Any]) -> None:
        rec["polls"] += 1

    def ready(self, rec: dict[str, Any]) -> bool:
        if self.never_ready:
            return False
        if rec["polls"] >= self.ready_after_polls:
            return True
        return self.ready_after_s is not None and time.monotonic() - rec["born"] >= self.ready_after_s

    # --- one request -----------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in h.headers.items()}
        try:
            body = json.loads(raw) if raw else None
            bad_json = False
        except ValueError:
            body, bad_json = raw.decode("utf-8", "replace"), True
        with self._lock:
            self.requests.append({"method": h.command, "path": parts.path, "query": parts.query,
                                  "headers": headers, "json": body})
            if not self.authorized(h.headers.get("Authorization", "")):
                status, out, extra = self.error(401, "missing bearer token" if not h.headers.get("Authorization")
                                                else "invalid bearer token", "global/invalid-api-key")
            else:
                fault = next((f for f in self._faults if (not f["prefix"] or parts.path.startswith(f["prefix"]))
                              and f["method"] in (None, h.command)), None)
                if fault is not None:
                    self._faults.remove(fault)
                    status, out, extra = self.fault(fault)
                elif bad_json:
                    status, out, extra = self.error(400, "request body is not JSON", "global/invalid-parameters")
                else:
                    try:
                        status, out, extra = self.route(h.command, parts.path, parse_qs(parts.query), body)
                    except Exception as e:  # a fake bug: answer, and keep it for the test to see
                        self.crashes.append(repr(e))
                        status, out, extra = self.error(500, f"fake crashed: {e!r}")
                extra = {**self.extra_headers(), **extra}
            doc = document(self.provider)
            if self.authorized(h.headers.get("Authorization", "")):
                self.request_problems += doc.request_problems(h.command, parts.path, body)
            self.response_problems += doc.response_problems(h.command, parts.path, status, out,
                                                            extra.get("Content-Type", "application/json"))
        data = b"" if out is None else json.dumps(out).encode()
        h.send_response(status)
        ctype = extra.pop("Content-Type", "application/json")
        if data:
            h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            h.send_header(k, v)
        h.end_headers()
        if data:
            h.wfile.write(data)

    def fault(self, f: dict[str, Any]) -> Reply:
        status = f["status"]
        msg = f["message"] or {429: "rate limit exceeded for the minute window", 500: "internal server error",
                               502: "bad gateway", 503: "service unavailable"}.get(status, "injected failure")
        s, out, extra = self.error(status, msg, "global/internal-error" if status >= 500 else "global/invalid-parameters")
        if f["empty"]:
            out, extra = None, {}
        if status == 429 and (f["retry_after"] is not None or self.provider == "runpod"):
            extra = {**extra, "Retry-After": f"{f['retry_after'] or 0:g}"}
        return s, out, extra


# =============================================================================================
# RunPod REST v2


RUNPOD_GPUS: list[dict[str, Any]] = [
    {"id": "NVIDIA H100 80GB HBM3", "name": "H100 SXM", "pool": "HOPPER_80", "manufacturer": "NVIDIA", "memory": 80,
     "secure": True, "community": True, "price": {"secure": 2.99, "community": 2.49, "serverless": 4.18},
     "maxCount": {"secure": 8, "community": 8}, "availability": "HIGH",
     "dataCenters": [{"id": "US-TX-3", "name": "US Texas 3", "availability": "HIGH"},
                     {"id": "EU-RO-1", "name": "EU Romania 1", "availability": "NONE"}]},
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "pool": "ADA_24", "manufacturer": "NVIDIA", "memory": 24,
     "secure": True, "community": True, "price": {"secure": 0.44, "community": 0.31, "serverless": 1.1},
     "maxCount": {"secure": 8, "community": 4}, "availability": "HIGH",
     "dataCenters": [{"id": "US-KS-2", "name": "US Kansas 2", "availability": "HIGH"}]},
    {"id": "NVIDIA A100-SXM4-80GB", "name": "A100 SXM", "pool": "AMPERE_80", "manufacturer": "NVIDIA", "memory": 80,
     "secure": True, "community": False, "price": {"secure": 1.74, "community": 0.0, "serverless": 2.72},
     "maxCount": {"secure": 8, "community": 0}, "availability": "LOW",
     "dataCenters": [{"id": "US-TX-3", "name": "US Texas 3", "availability": "LOW"}]},
    {"id": "NVIDIA RTX PRO 6000 Blackwell", "name": "RTX PRO 6000", "pool": "BLACKWELL_96", "manufacturer": "NVIDIA",
     "memory": 96, "secure": True, "community": False, "price": {"secure": 1.84, "community": 0.0, "serverless": 2.5},
     "maxCount": {"secure": 8, "community": 0}, "availability": "MEDIUM",
     "dataCenters": [{"id": "EU-RO-1", "name": "EU Romania 1", "availability": "MEDIUM"}]},
]

_POD_FIELDS = {"name", "image", "gpu", "cpu", "cloud", "dataCenterIds", "disk", "mounts", "ports", "env", "args",
               "registry", "templateId", "startSsh", "startJupyter", "globalNetworking"}
_POD_GPU_FIELDS = {"id", "count", "allowedCudaVersions", "minCudaVersion"}
_CLUSTER_FIELDS = {"name", "type", "compute", "image", "args", "disk", "env", "ports", "dataCenterIds", "mounts",
                   "startSsh", "startJupyter"}
_COMPUTE_FIELDS = {"gpuTypeId", "gpuCountPerPod", "podCount"}
_PORT = re.compile(r"^\d+/(http|tcp)$")


class FakeRunPod(_Fake):
    """RunPod REST v2 under /v2: catalog/gpus, pods (CRUD + action), clusters (+ members)."""

    default_key = RUNPOD_KEY
    provider = "runpod"

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.gpus = json.loads(json.dumps(RUNPOD_GPUS))
        self.clusters: dict[str, dict[str, Any]] = {}
        self.capacity_detail = RUNPOD_NO_CAPACITY
        self.refuse: dict[tuple[str, str, str], tuple[int, str]] = {}  # (gpu id, data center, cloud) -> answer
        self.unreachable: list[str] = []  # pods whose image never started sshd
        self.cluster_gpus: set[str] | None = None  # GPU ids with Instant Cluster stock (None: as for pods)
        self.keep_terminated = False  # True: GET of a deleted pod answers TERMINATED instead of 404

    def error(self, status: int, message: str, code: str | None = None, errors: list[str] | None = None) -> Reply:
        titles = {400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
                  409: "Conflict", 422: "Unprocessable Entity", 429: "Too Many Requests",
                  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        body: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": message}
        if errors:
            body["errors"] = errors
        return status, body, {"Content-Type": "application/problem+json"}

    def extra_headers(self) -> dict[str, str]:
        return {"RateLimit": '"minute";r=59;t=60, "hour";r=2999;t=3600, "day";r=49999;t=86400',
                "RateLimit-Policy": '"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400'}

    # --- views -----------------------------------------------------------------------------------

    def status(self, rec: dict[str, Any]) -> str:
        if rec["terminated"]:
            return "TERMINATED"
        if self.ready(rec):
            return "RUNNING"
        return "STARTING" if rec["polls"] > 0 and not self.never_ready else "PROVISIONING"

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        st = self.status(rec)
        up = st == "RUNNING"
        ssh22 = up and "22/tcp" in rec["ports"]
        pid = rec["id"]
        pod: dict[str, Any] = {
            "id": pid, "name": rec["name"], "image": rec["image"], "args": rec.get("args", ""), "disk": rec["disk"],
            "ports": rec["ports"], "env": rec["env"], "registry": None, "status": st,
            "actions": {"RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"],
                        "ERROR": ["start", "terminate"], "TERMINATED": []}.get(st, ["stop", "terminate"]),
            "mounts": rec.get("mounts") or {}, "gpu": {"id": rec["gpu_id"], "count": rec["gpu_count"]},
            "cloud": rec["cloud"], "dataCenterId": rec["dc"], "cudaVersion": "12.8",
            # proxy: null until the pod has a machine; direct: null until 22/tcp has a public port; runtime: null
            # unless RUNNING (the document's PodSsh and Pod.runtime)
            "ssh": {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": f"{pid}-64411eb2",
                              "command": f"ssh {pid}-64411eb2@ssh.runpod.io"} if st in ("STARTING", "RUNNING") else None,
                    "direct": {"host": rec["ssh_host"], "port": rec["ssh_port"], "username": "root",
                               "command": f"ssh root@{rec['ssh_host']} -p {rec['ssh_port']}"} if ssh22 else None},
            "template": None, "cost": rec["cost"], "locked": False, "globalNetworking": {"enabled": False},
            "runtime": {"uptime": 1, "ports": [{"private": 22, "public": rec["ssh_port"], "type": "tcp",
                                                "ip": rec["ssh_host"]}] if ssh22 else []} if up else None,
            "createdAt": rec["created_at"], "startedAt": rec["created_at"] if up else None,
        }
        if rec.get("cluster_id"):
            pod["cluster"] = {"id": rec["cluster_id"], "rank": rec["rank"], "ip": rec["private_ip"]}  # no role: TRAINING
        return pod

    def cluster_view(self, c: dict[str, Any]) -> dict[str, Any]:
        members = [self.instances[p] for p in c["pods"]]
        by: dict[str, int] = {}
        for m in members:
            by[self.status(m)] = by.get(self.status(m), 0) + 1
        primary = members[0]
        pv: dict[str, Any] = {"podId": primary["id"], "status": self.status(primary)}
        if self.status(primary) == "RUNNING":
            pv["sshEndpoint"] = f"{primary['ssh_host']}:{primary['ssh_port']}"
        return {"id": c["id"], "name": c["name"], "type": c["type"], "compute": c["compute"], "dataCenterId": c["dc"],
                "pods": {"total": len(members), "byStatus": by}, "network": {"cidr": "10.65.0.0/16"},
                "primary": pv, "createdAt": c["created_at"]}

    # --- validation ------------------------------------------------------------------------------

    def _container_problems(self, body: dict[str, Any], fields: set[str]) -> list[str]:
        errs = [f"$: additional properties '{k}' not allowed" for k in body if k not in fields]
        if not isinstance(body.get("name"), str) or not body.get("name"):
            errs.append("$: missing property 'name'")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            errs.append("$.env: expected object of strings")
        ports = body.get("ports", [])
        if not isinstance(ports, list) or not all(isinstance(p, str) and _PORT.match(p) for p in ports):
            errs.append("$.ports: expected array of '<port>/<http|tcp>'")
        if "disk" in body and (not isinstance(body["disk"], int) or body["disk"] < 1):
            errs.append("$.disk: expected integer >= 1")
        return errs

    def _gpu(self, gpu_id: str) -> dict[str, Any] | None:
        return next((g for g in self.gpus if g["id"] == gpu_id), None)

    def _hook(self, rec: dict[str, Any]) -> None:
        """sshd starts only in images that honour RunPod's PUBLIC_KEY convention (its own images, per the document's
        `startSsh`), or where the start command starts it: only then is the instance reachable (on_create)."""
        if rec["image"].startswith("runpod/") or "sshd" in (rec.get("args") or ""):
            super()._hook(rec)
        else:
            self.unreachable.append(rec["id"])

    def _record(self, body: dict[str, Any], name: str, gpu_id: str, count: int, cloud: str, dc: str,
                **extra: Any) -> dict[str, Any]:
        g = self._gpu(gpu_id) or {}
        price = (g.get("price") or {}).get(cloud.lower()) or 0
        return self._new_record(id=uuid.uuid4().hex[:14], name=name, image=body.get("image") or "", args=body.get("args") or "",
                                disk=body.get("disk", 50),
                                ports=list(body.get("ports") or []), env=dict(body.get("env") or {}),
                                mounts=body.get("mounts"), gpu_id=gpu_id, gpu_count=count, cloud=cloud, dc=dc,
                                cost=round(price * count, 4), **extra)

    # --- routes ----------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Reply:
        q = {k: v[-1] for k, v in query.items()}
        segs = path.strip("/").split("/")
        if segs[0] != "v2":
            return self.error(404, "resource not found")
        segs = [unquote(s) for s in segs[1:]]
        if segs == ["catalog", "gpus"] and method == "GET":
            return self._catalog(q)
        if segs == ["pods"] and method == "POST":
            return self._create_pod(body)
        if segs == ["pods"] and method == "GET":
            return self._list_pods(q)
        if len(segs) == 2 and segs[0] == "pods":
            rec = self.instances.get(segs[1])
            if rec is None or (rec["terminated"] and not self.keep_terminated):
                return self.error(404, "resource not found")
            if method == "GET":
                self._poll(rec)
                return 200, self.view(rec), {}
            if method == "DELETE":
                if rec["terminated"]:
                    return self.error(404, "resource not found")
                if rec.get("cluster_id"):
                    return self.error(409, "pod is a member of a cluster; delete the cluster instead")
                rec["terminated"] = True
                return 204, None, {}
        if len(segs) == 3 and segs[0] == "pods" and segs[2] == "action" and method == "POST":
            return self._action(segs[1], body)
        if segs == ["clusters"] and method == "POST":
            return self._create_cluster(body)
        if segs == ["clusters"] and method == "GET":
            return 200, {"clusters": [self.cluster_view(c) for c in self.clusters.values() if not c["deleted"]]}, {}
        if len(segs) >= 2 and segs[0] == "clusters":
            c = self.clusters.get(segs[1])
            if c is None or c["deleted"]:
                return self.error(404, "resource not found")
            if len(segs) == 2 and method == "GET":
                return 200, self.cluster_view(c), {}
            if len(segs) == 2 and method == "DELETE":
                c["deleted"] = True
                for p in c["pods"]:
                    self.instances[p]["terminated"] = True
                return 204, None, {}
            if segs[2:] == ["pods"] and method == "GET":
                members = [self.instances[p] for p in c["pods"]]
                for m in members:
                    self._poll(m)
                return 200, {"pods": [self.view(m) for m in members]}, {}
        return self.error(404, "resource not found")

    def _catalog(self, q: dict[str, str]) -> Reply:
        if ("include" in q) != ("product" in q):
            return self.error(400, "include=AVAILABILITY requires product, and product requires the include")
        cloud = q.get("cloud", "SECURE")
        if cloud not in ("SECURE", "COMMUNITY"):
            return self.error(422, "Request validation failed.", errors=[f"cloud: unknown value {cloud!r}"])
        products = set(q.get("product", "").split(",")) - {""}
        if products - {"POD", "CLUSTER", "SERVERLESS"}:
            return self.error(422, "Request validation failed.", errors=[f"product: unknown value {q['product']!r}"])
        count = int(q.get("count", "1"))
        out = []
        for g in self.gpus:
            row = {k: v for k, v in g.items() if k not in ("availability", "dataCenters")}
            if "include" in q:
                tier = cloud.lower()
                fits = bool(g.get(tier)) and count <= int((g.get("maxCount") or {}).get(tier) or 0)
                if products == {"CLUSTER"}:  # Instant Cluster stock: its own (cluster_gpus), SECURE only
                    fits = fits and cloud == "SECURE" and (self.cluster_gpus is None or g["id"] in self.cluster_gpus)
                row["availability"] = g.get("availability", "NONE") if fits else "NONE"
                # only the data centers that offer it now; none at all when it is unavailable everywhere
                dcs = [dc for dc in g.get("dataCenters") or [] if fits and dc["availability"] != "NONE"]
                if dcs:
                    row["dataCenters"] = dcs
            out.append(row)
        return 200, {"gpus": out}, {}

    def _create_pod(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return self.error(422, "Request validation failed.", errors=["$: expected object"])
        errs = self._container_problems(body, _POD_FIELDS)
        gpu = body.get("gpu")
        if gpu is not None:
            if not isinstance(gpu, dict) or not isinstance(gpu.get("id"), str):
                errs.append("$.gpu: missing property 'id'")
            else:
                errs += [f"$.gpu: additional properties '{k}' not allowed" for k in gpu if k not in _POD_GPU_FIELDS]
                if not isinstance(gpu.get("count", 1), int) or gpu.get("count", 1) < 1:
                    errs.append("$.gpu.count: expected integer >= 1")
        if body.get("cloud", "SECURE") not in ("SECURE", "COMMUNITY"):
            errs.append("$.cloud: value must be one of 'SECURE', 'COMMUNITY'")
        if errs:
            return self.error(422, "Request validation failed.", errors=errs)
        if (gpu is None) == (body.get("cpu") is None):
            return self.error(400, "exactly one of gpu or cpu must be given")
        if not body.get("image") and not body.get("templateId"):
            return self.error(400, "image is required unless templateId is given")
        if gpu is None:
            return self.error(400, "this fake serves GPU pods only")
        g = self._gpu(gpu["id"])
        if g is None:
            return self.error(400, f"unknown gpu type id {gpu['id']!r}")
        dcs = body.get("dataCenterIds") or []
        refused = self.refuse.get((gpu["id"], dcs[0] if dcs else "", body.get("cloud", "SECURE")))
        if refused:
            return self.error(*refused)
        if self.no_capacity:
            return self.error(400, self.capacity_detail.format(gpu=gpu["id"]))
        rec = self._record(body, body["name"], gpu["id"], gpu.get("count", 1), body.get("cloud", "SECURE"),
                           dcs[0] if dcs else "US-TX-3")
        self._hook(rec)
        return 201, self.view(rec), {}

    def _list_pods(self, q: dict[str, str]) -> Reply:
        with_members = q.get("includeClusterPods") == "true"
        rows = [r for r in self.instances.values()
                if not r["terminated"] and (with_members or not r.get("cluster_id"))]
        for r in rows:
            self._poll(r)
        return 200, {"pods": [self.view(r) for r in rows]}, {}

    def _action(self, pid: str, body: Any) -> Reply:
        rec = self.instances.get(pid)
        if rec is None or rec["terminated"]:
            return self.error(404, "resource not found")
        action = (body or {}).get("action") if isinstance(body, dict) else None
        if action not in ("start", "stop", "restart", "terminate"):
            return self.error(422, "Request validation failed.", errors=["$.action: unknown action"])
        if action not in self.view(rec)["actions"]:
            return self.error(409, f"action {action} is not valid in status {self.status(rec)}")
        if action == "terminate":
            if rec.get("cluster_id"):
                return self.error(409, "pod is a member of a cluster; delete the cluster instead")
            rec["terminated"] = True
            return 204, None, {}
        return 200, self.view(rec), {}

    def _create_cluster(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return self.error(422, "Request validation failed.", errors=["$: expected object"])
        errs = self._container_problems(body, _CLUSTER_FIELDS)
        if body.get("type") not in ("APPLICATION", "TRAINING", "SLURM", "RAY"):
            errs.append("$.type: value must be one of 'APPLICATION', 'TRAINING', 'SLURM', 'RAY'")
        comp = body.get("compute")
        if not isinstance(comp, dict):
            errs.append("$: missing property 'compute'")
        else:
            errs += [f"$.compute: additional properties '{k}' not allowed" for k in comp if k not in _COMPUTE_FIELDS]
            errs += [f"$.compute: missing property '{k}'" for k in sorted(_COMPUTE_FIELDS) if k not in comp]
            pc = comp.get("podCount")
            if "podCount" in comp and (not isinstance(pc, int) or not 2 <= pc <= 250):
                errs.append("$.compute.podCount: expected integer 2..250")
        if errs:
            return self.error(422, "Request validation failed.", errors=errs)
        if self._gpu(comp["gpuTypeId"]) is None:
            return self.error(400, f"unknown gpu type id {comp['gpuTypeId']!r}")
        if self.no_capacity:
            return self.error(400, self.capacity_detail.format(gpu=comp["gpuTypeId"]))
        cid = "cluster_" + uuid.uuid4().hex[:8]
        dcs = body.get("dataCenterIds") or []
        dc = dcs[0] if dcs else "US-TX-3"
        c = {"id": cid, "name": body["name"], "type": body["type"], "compute": comp, "dc": dc, "pods": [],
             "deleted": False, "created_at": _now()}
        members = []
        for rank in range(comp["podCount"]):
            rec = self._record(body, f"{cid}-node{rank}", comp["gpuTypeId"], comp["gpuCountPerPod"], "SECURE", dc,
                               cluster_id=cid, rank=rank)
            self._hook(rec)
            members.append(rec)
            c["pods"].append(rec["id"])
        primary = members[0]["private_ip"]
        for rec in members:  # what RunPod puts in every node's environment
            rec["env"] = {**rec["env"], "PRIMARY_ADDR": primary, "MASTER_ADDR": primary, "PRIMARY_PORT": "29500",
                          "MASTER_PORT": "29500", "NODE_ADDR": rec["private_ip"], "NODE_RANK": str(rec["rank"]),
                          "NUM_NODES": str(len(members)), "NUM_TRAINERS": str(comp["gpuCountPerPod"]),
                          "HOST_NODE_ADDR": f"{primary}:29500",
                          "WORLD_SIZE": str(len(members) * comp["gpuCountPerPod"])}
        self.clusters[cid] = c
        return 201, self.cluster_view(c), {}


# =============================================================================================
# Lambda Cloud API v1


def _lambda_type(name: str, desc: str, gpu_desc: str, cents: int, n: int, regions: list[str]) -> dict[str, Any]:
    names = {"us-west-1": "California, USA", "us-east-1": "Virginia, USA", "us-south-1": "Texas, USA"}
    return {"instance_type": {"name": name, "description": desc, "gpu_description": gpu_desc,
                              "price_cents_per_hour": cents,
                              "specs": {"vcpus": 26 * n, "memory_gib": 225 * n, "storage_gib": 2750 * n, "gpus": n}},
            "regions_with_capacity_available": [{"name": r, "description": names.get(r, r)} for r in regions]}


LAMBDA_TYPES: dict[str, Any] = {
    "gpu_1x_h100_pcie": _lambda_type("gpu_1x_h100_pcie", "1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 1,
                                     ["us-west-1", "us-east-1"]),
    "gpu_8x_h100_sxm5": _lambda_type("gpu_8x_h100_sxm5", "8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 8,
                                     ["us-south-1"]),
    "gpu_1x_a100_sxm4": _lambda_type("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 129, 1, []),
    "gpu_1x_gh200": _lambda_type("gpu_1x_gh200", "1x GH200 (96 GB)", "GH200 (96 GB)", 149, 1, ["us-east-1"]),
    "cpu_4x_general": {"instance_type": {"name": "cpu_4x_general", "description": "4x CPU", "gpu_description": "",
                                         "price_cents_per_hour": 20,
                                         "specs": {"vcpus": 4, "memory_gib": 16, "storage_gib": 0, "gpus": 0}},
                       "regions_with_capacity_available": [{"name": "us-west-1", "description": "California, USA"}]},
}

_LAUNCH_FIELDS = {"region_name", "instance_type_name", "ssh_key_names", "name", "hostname", "file_system_names",
                  "file_system_mounts", "image", "user_data", "tags", "firewall_rulesets", "quantity"}
_HOSTNAME = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")


class FakeLambda(_Fake):
    """Lambda Cloud API v1 under /api/v1: instance-types, launch, instances, terminate, ssh-keys."""

    default_key = LAMBDA_KEY
    provider = "lambda"

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.instance_types = json.loads(json.dumps(LAMBDA_TYPES))
        self.ssh_keys: list[dict[str, str]] = []
        self.launch_interval_s: float | None = None  # set to enforce Lambda's 1 launch / 12 s with 429s
        self.omit_private_ip = False
        self._last_launch: float | None = None

    def authorized(self, header: str) -> bool:
        basic = {"Basic " + base64.b64encode(f"{self.key}:".encode()).decode(), f"Basic {self.key}"}
        return header == f"Bearer {self.key}" or header in basic

    def error(self, status: int, message: str, code: str | None = None, errors: list[str] | None = None) -> Reply:
        defaults = {401: ("global/invalid-api-key", "API key was invalid, expired, or deleted.",
                          "Check your API key or create a new one, then try again."),
                    429: ("global/too-many-requests", "Your API requests are being rate limited.", None),
                    500: ("global/internal-error", "An internal server error occurred.", None)}
        suggestion = None
        if status in defaults:
            code, default_message, suggestion = defaults[status]
            message = default_message if status == 401 or not message else message
        err: dict[str, Any] = {"code": code or "global/invalid-parameters", "message": message}
        if suggestion:
            err["suggestion"] = suggestion
        return status, {"error": err}, {}

    def status(self, rec: dict[str, Any]) -> str:
        if rec["terminated"]:
            return "terminating"
        return "active" if self.ready(rec) else "booting"

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        st = self.status(rec)
        it = self.instance_types[rec["type"]]["instance_type"]
        d: dict[str, Any] = {
            "id": rec["id"], "name": rec["name"], "status": st, "ssh_key_names": rec["ssh_key_names"],
            "file_system_names": [], "region": {"name": rec["region"], "description": rec["region"]},
            "instance_type": it, "tags": rec["tags"],
            "actions": {a: ({"available": True} if st == "active" else
                            {"available": False, "reason_code": "vm-has-not-launched",
                             "reason_description": "The instance has not launched yet."})
                        for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")},
        }
        if st == "active":  # private_ip is optional in the document: omit_private_ip leaves it out
            d.update(ip=rec["ssh_host"], hostname=rec.get("hostname") or rec["ssh_host"])
            if not self.omit_private_ip:
                d["private_ip"] = rec["private_ip"]
        return d

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Reply:
        if not path.startswith("/api/v1/"):
            return self.error(404, "Not found.", "global/object-does-not-exist")
        p = path[len("/api/v1"):]
        if p == "/instance-types" and method == "GET":
            return 200, {"data": self.instance_types}, {}
        if p == "/instances" and method == "GET":
            rows = [r for r in self.instances.values() if not r["terminated"]]
            for r in rows:
                self._poll(r)
            return 200, {"data": [self.view(r) for r in rows]}, {}
        if p.startswith("/instances/") and method == "GET":
            rec = self.instances.get(p.split("/")[2])
            if rec is None or rec["terminated"]:
                return self.error(404, "Specified instance does not exist.", "global/object-does-not-exist")
            self._poll(rec)
            return 200, {"data": self.view(rec)}, {}
        if p == "/instance-operations/launch" and method == "POST":
            return self._launch(body)
        if p == "/instance-operations/terminate" and method == "POST":
            return self._terminate(body)
        if p == "/ssh-keys" and method == "GET":
            return 200, {"data": [{k: v for k, v in key.items() if k != "private_key"} for key in self.ssh_keys]}, {}
        if p == "/ssh-keys" and method == "POST":
            return self._add_key(body)
        if p.startswith("/ssh-keys/") and method == "DELETE":
            kid = p.split("/")[2]
            if not any(k["id"] == kid for k in self.ssh_keys):
                return self.error(404, "SSH key was not found.", "global/object-does-not-exist")
            self.ssh_keys = [k for k in self.ssh_keys if k["id"] != kid]
            return 200, {"data": {}}, {}
        return self.error(404, "Not found.", "global/object-does-not-exist")

    def _invalid(self, why: str) -> Reply:
        return self.error(400, f"Invalid request data. {why}", "global/invalid-parameters")

    def _launch(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return self._invalid("Expected an object.")
        unknown = sorted(set(body) - _LAUNCH_FIELDS)
        if unknown:
            return self._invalid(f"Unknown fields: {', '.join(unknown)}.")
        for f in ("region_name", "instance_type_name", "ssh_key_names"):
            if not body.get(f):
                return self._invalid(f"{f}: Field required.")
        if int(body.get("quantity", 1)) > 1:
            return self._invalid("Requested too many instances.")
        keys = body["ssh_key_names"]
        if not isinstance(keys, list) or len(keys) != 1:
            return self._invalid("ssh_key_names: exactly one SSH key name must be given.")
        if len(str(body.get("name", ""))) > 64:
            return self._invalid("name: at most 64 characters.")
        if "hostname" in body and not _HOSTNAME.match(str(body["hostname"])):
            return self._invalid("hostname: does not match ^[a-z0-9][0-9a-z-]{0,62}$.")
        for t in body.get("tags") or []:
            if not isinstance(t, dict) or not _TAG_KEY.match(str(t.get("key", ""))) or len(str(t.get("value", ""))) > 128:
                return self._invalid(f"tags: bad tag {t!r}.")
        img = body.get("image")
        if img is not None and (not isinstance(img, dict) or len(img) != 1 or not ({"id", "family"} & set(img))):
            return self._invalid("image: give {'id': ...} or {'family': ...}.")
        if not any(k["name"] == keys[0] for k in self.ssh_keys):
            return self.error(404, "Specified SSH key does not exist.", "global/object-does-not-exist")
        tname = body["instance_type_name"]
        if tname not in self.instance_types:
            return self._invalid(f"instance_type_name: unknown instance type {tname!r}.")
        now = time.monotonic()
        if self.launch_interval_s and self._last_launch is not None and now - self._last_launch < self.launch_interval_s:
            return self.error(429, "")  # no Retry-After: Lambda's document promises none
        capacity = [r["name"] for r in self.instance_types[tname]["regions_with_capacity_available"]]
        if self.no_capacity or body["region_name"] not in capacity:
            return self.error(400, "Not enough capacity to fulfill launch request.",
                              "instance-operations/launch/insufficient-capacity")
        self._last_launch = now
        rec = self._new_record(id=uuid.uuid4().hex, name=body.get("name") or "", type=tname, region=body["region_name"],
                               ssh_key_names=list(keys), tags=list(body.get("tags") or []),
                               hostname=body.get("hostname"), user_data=body.get("user_data"), image=img)
        self._hook(rec)
        return 200, {"data": {"instance_ids": [rec["id"]]}}, {}

    def _terminate(self, body: Any) -> Reply:
        ids = body.get("instance_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids:
            return self._invalid("instance_ids: Field required.")
        recs = [self.instances.get(i) for i in ids]
        if any(r is None or r["terminated"] for r in recs):
            return self.error(404, "Specified instance does not exist.", "global/object-does-not-exist")
        for r in recs:
            r["terminated"] = True
        return 200, {"data": {"terminated_instances": [self.view(r) for r in recs]}}, {}

    def _add_key(self, body: Any) -> Reply:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            return self._invalid("name: 1 to 64 characters.")
        if any(k["name"] == name for k in self.ssh_keys):
            return self.error(400, "An SSH key with this name already exists.", "global/duplicate")
        pub = body.get("public_key")
        key = {"id": uuid.uuid4().hex, "name": name}
        if pub is None:
            key.update(public_key=f"ssh-ed25519 AAAAFAKE{uuid.uuid4().hex} {name}",
                       private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nFAKE\n-----END OPENSSH PRIVATE KEY-----\n")
        elif not isinstance(pub, str) or len(pub) > 4096 or not pub.strip():
            return self._invalid("public_key: at most 4096 characters.")
        else:
            key["public_key"] = pub
        self.ssh_keys.append(key)
        return 200, {"data": key}, {}


# =============================================================================================
# fixtures


@pytest.fixture
def fake_runpod(monkeypatch: pytest.MonkeyPatch, tmp_path: Any):
    """A started FakeRunPod with FTL_RUNPOD_API_URL and RUNPOD_API_KEY pointing at it."""
    with FakeRunPod() as fake:
        monkeypatch.setenv("FTL_RUNPOD_API_URL", fake.url)
        monkeypatch.setenv("RUNPOD_API_KEY", fake.key)
        monkeypatch.setenv("FTL_CONFIG_DIR", str(tmp_path / "ftl-config"))
        yield fake


@pytest.fixture
def fake_lambda(monkeypatch: pytest.MonkeyPatch, tmp_path: Any):
    """A started FakeLambda with FTL_LAMBDA_API_URL and LAMBDA_API_KEY pointing at it."""
    with FakeLambda() as fake:
        monkeypatch.setenv("FTL_LAMBDA_API_URL", fake.url)
        monkeypatch.setenv("LAMBDA_API_KEY", fake.key)
        monkeypatch.setenv("FTL_CONFIG_DIR", str(tmp_path / "ftl-config"))
        yield fake
