"""Requests and answers checked against the providers' own OpenAPI documents (tests/providers_openapi/).

The fakes call `Document.request_problems` on every body a client sends and `Document.response_problems` on
every answer they give; the validation itself is openapi-schema-validator's (OpenAPI 3.1 = JSON Schema
2020-12), this module only finds which schema of the document applies: the operation by method and path
template, then the request body, or the response by status code (else `default`).

Where a document lists no answer for a status (Lambda documents no 429 and no 5xx), the document is silent
and nothing is checked; `silent` records each such (method, template, status) so a test can see it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS31Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

HERE = Path(__file__).resolve().parent / "providers_openapi"
FILES = {"runpod": "runpod-rest-v2.openapi.json", "lambda": "lambda-cloud-v1.openapi.json"}
METHODS = ("get", "put", "post", "delete", "patch")


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Document:
    """One provider's OpenAPI document: which schema applies to a request or an answer, and what it finds."""

    def __init__(self, path: Path):
        self.doc = json.loads(path.read_text())
        self.uri = f"urn:ftl-test:{path.name}"
        self.registry = Registry().with_resource(self.uri, DRAFT202012.create_resource(self.doc))
        self.silent: set[tuple[str, str, int]] = set()
        # literal paths before templated ones, so /v2/pods/{id}/action never hides /v2/clusters/{id}/pods
        self._routes = sorted(((tpl, re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(tpl)) + "$"))
                               for tpl in self.doc["paths"]), key=lambda r: (r[0].count("{"), r[0]))

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        for tpl, rx in self._routes:
            if rx.match(path):
                op = self.doc["paths"][tpl].get(method.lower())
                if op is not None:
                    return tpl, op
        return None

    def _deref(self, obj: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in obj:
            node: Any = self.doc
            for part in obj["$ref"].lstrip("#/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            obj = node
        return obj

    def _problems(self, pointer: str, instance: Any) -> list[str]:
        v = OAS31Validator({"$ref": self.uri + pointer}, registry=self.registry,
                           format_checker=OAS31Validator.FORMAT_CHECKER)
        return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
                for e in sorted(v.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]

    def request_problems(self, method: str, path: str, body: Any) -> list[str]:
        """What the document says is wrong with this request body (an undocumented operation is one problem)."""
        found = self.operation(method, path)
        if found is None:
            return [f"{method} {path}: no such operation in the document"]
        tpl, op = found
        rb = op.get("requestBody")
        if rb is None:
            return [] if body is None else [f"{method} {tpl}: the document takes no request body"]
        rb = self._deref(rb)
        if body is None:
            return [f"{method} {tpl}: a request body is required"] if rb.get("required") else []
        if "application/json" not in rb.get("content", {}):
            return [f"{method} {tpl}: the document takes no JSON body"]
        ptr = _pointer("paths", tpl, method.lower(), "requestBody", "content", "application/json", "schema")
        if "$ref" in op["requestBody"]:
            ptr = op["requestBody"]["$ref"] + "/content/application~1json/schema"
        return [f"{method} {tpl} request: {p}" for p in self._problems(ptr, body)]

    def response_problems(self, method: str, path: str, status: int, body: Any, content_type: str) -> list[str]:
        """What the document says is wrong with this answer; [] where the document is silent on the status."""
        found = self.operation(method, path)
        if found is None:
            return []  # the request was already reported
        tpl, op = found
        responses = op.get("responses", {})
        key = str(status) if str(status) in responses else "default" if "default" in responses else None
        if key is None:
            if status == 429 or status >= 500:
                self.silent.add((method, tpl, status))
                return []
            return [f"{method} {tpl}: answered {status}, which the document does not list"]
        resp = self._deref(responses[key])
        content = resp.get("content") or {}
        if not content:
            return [] if body is None else [f"{method} {tpl} {status}: the document gives this answer no body"]
        ctype = content_type.split(";")[0].strip()
        if ctype not in content:
            return [f"{method} {tpl} {status}: content type {ctype}, the document has {', '.join(content)}"]
        ptr = self._response_pointer(tpl, method, key, ctype)
        return [f"{method} {tpl} {status}: {p}" for p in self._problems(ptr, body)]

    def _response_pointer(self, tpl: str, method: str, key: str, ctype: str) -> str:
        ref = self.doc["paths"][tpl][method.lower()]["responses"][key]
        base = ref["$ref"] if "$ref" in ref else _pointer("paths", tpl, method.lower(), "responses", key)
        return base + "/content/" + ctype.replace("~", "~0").replace("/", "~1") + "/schema"


@lru_cache(maxsize=None)
def document(provider: str) -> Document:
    return Document(HERE / FILES[provider])
