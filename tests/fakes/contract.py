"""Contract checks against the providers' published OpenAPI documents (../shared/apis).

Why: a fake written from our own reading of an API shares the adapter's misreadings. Here every
request an adapter sends and every response a fake returns is validated against the vendored
spec's own schemas (jsonschema, through openapi-schema-validator's OAS 3.0 / 3.1 dialects), so a
fake that disagrees with the spec, or an adapter that sends a field the spec does not have, fails.

Where the specs live: CI runs in a fresh clone with a copy of `shared/` beside it, so the specs are
found at `<repo>/../shared/apis` (or `$CLOUDTUNE_SHARED_APIS`); `specs_dir()` fails with one line
saying so when they are missing.

What is checked per exchange (`ApiSpec.check`):
- the path + method is an operation of the spec;
- the JSON request body validates against the operation's requestBody schema, and the query
  parameters the operation declares validate against their schemas (form style, comma lists);
- the response status is documented for the operation (or `default`), its content type is one the
  spec lists, and its JSON body validates against that schema;
- the document's `x-input-validation` limits (Vast) hold for the request body.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def specs_dir() -> Path:
    """`$CLOUDTUNE_SHARED_APIS`, else <repo>/../shared/apis; a clear error when absent."""
    env = os.environ.get("CLOUDTUNE_SHARED_APIS")
    path = Path(env) if env else REPO.parent / "shared" / "apis"
    if not (path / "README.md").is_file():
        raise FileNotFoundError(
            f"the vendored provider API specs are missing: expected {path}/README.md (a copy of shared/apis "
            "beside the repository, or set CLOUDTUNE_SHARED_APIS)"
        )
    return path


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)


@dataclass
class Operation:
    doc: ApiSpecDoc
    method: str
    template: str
    op: dict[str, Any]
    params: dict[str, list[str]] = field(default_factory=dict)


class ApiSpecDoc:
    """One OpenAPI document with a validator that resolves its local $refs."""

    def __init__(self, path: Path) -> None:
        from openapi_schema_validator import OAS30Validator, OAS31Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4, DRAFT202012

        self.path = path
        self.doc = _load(path)
        self.version = str(self.doc.get("openapi", ""))
        self.is31 = self.version.startswith("3.1")
        self._validator_cls = OAS31Validator if self.is31 else OAS30Validator
        spec = DRAFT202012 if self.is31 else DRAFT4
        self._uri = f"urn:spec:{path.name}"
        self._registry = Registry().with_resource(self._uri, Resource(contents=self.doc, specification=spec))

    def errors(self, schema: dict[str, Any], instance: Any, where: str) -> list[str]:
        """Every violation of `schema` (a node of this document) by `instance`, one line each."""
        validator = self._validator_cls(self._rebase(schema), registry=self._registry)
        out = []
        for err in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
            loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
            out.append(f"{where}: {loc}: {err.message[:300]}")
        return out

    def _rebase(self, node: Any) -> Any:
        """Copy a schema so local '#/...' refs point into this document in the registry."""
        if isinstance(node, dict):
            return {k: (self._uri + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else self._rebase(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [self._rebase(v) for v in node]
        return node

    def resolve(self, node: Any) -> Any:
        """Follow a local `$ref` (responses, parameters, headers) to its target."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target: Any = self.doc
            for part in node["$ref"][2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    rx = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(rx + "$")


class ApiSpec:
    """A provider's API: one or more documents, operations found by method + concrete path."""

    def __init__(self, name: str, docs: list[ApiSpecDoc], *, prefix: str = "") -> None:
        self.name = name
        self.docs = docs
        self.prefix = prefix  # what the fake serves before the spec's paths (none today)
        self._ops: list[tuple[str, re.Pattern[str], Operation]] = []
        for d in docs:
            for template, item in (d.doc.get("paths") or {}).items():
                for method, op in item.items():
                    if method.upper() in ("GET", "POST", "PUT", "DELETE", "PATCH"):
                        # static segments first (e.g. /instances/bid_price/{id} before /instances/{id})
                        self._ops.append((method.upper(), _template_regex(template), Operation(d, method.upper(),
                                                                                              template, op)))
        self._ops.sort(key=lambda t: t[2].template.count("{"))

    def operation(self, method: str, path: str) -> Operation | None:
        for m, rx, op in self._ops:
            if m == method.upper() and rx.match(path):
                return op
        return None

    # ------------------------------------------------------------ request

    def check_request(self, method: str, path: str, query: dict[str, list[str]], body: Any,
                      content_type: str = "application/json") -> list[str]:
        op = self.operation(method, path)
        where = f"{self.name} {method} {path}"
        if op is None:
            return [f"{where}: no such operation in the spec"]
        errors: list[str] = []
        rb = op.doc.resolve(op.op.get("requestBody"))
        if body is not None:
            if not rb:
                errors.append(f"{where}: the operation takes no request body")
            else:
                media = (rb.get("content") or {}).get("application/json")
                if media is None:
                    errors.append(f"{where}: the request body is JSON, the spec lists {list(rb.get('content') or {})}")
                elif media.get("schema"):
                    errors += op.doc.errors(media["schema"], body, f"{where} request body")
        elif rb and rb.get("required"):
            errors.append(f"{where}: the spec requires a request body")
        params = [op.doc.resolve(p) for p in op.op.get("parameters") or []]
        declared = {p["name"]: p for p in params if p.get("in") == "query"}
        for name, values in query.items():
            p = declared.get(name)
            if p is None:
                errors.append(f"{where}: query parameter {name!r} is not in the spec")
                continue
            schema = p.get("schema") or {}
            value: Any = values[-1]
            if schema.get("type") == "array":
                value = value.split(",")
            elif schema.get("type") == "integer":
                value = int(value) if re.fullmatch(r"-?\d+", value) else value
            elif schema.get("type") == "boolean":
                value = {"true": True, "false": False}.get(value, value)
            errors += op.doc.errors(schema, value, f"{where} query {name}")
        for p in params:
            if p.get("in") == "query" and p.get("required") and p["name"] not in query:
                errors.append(f"{where}: required query parameter {p['name']!r} missing")
        errors += self._input_limits(op, body, where)
        return errors

    @staticmethod
    def _input_limits(op: Operation, body: Any, where: str) -> list[str]:
        limits = op.doc.doc.get("x-input-validation") or {}
        if not isinstance(body, dict):
            return []
        errors = []
        for key, rule in limits.items():
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, str) and key == "env":
                entries = [e for e in split_docker_env(value)]
                for entry in entries:
                    if "max_length" in rule and len(entry) > rule["max_length"]:
                        errors.append(f"{where}: env entry {entry.split('=', 1)[0]!r} is {len(entry)} characters, "
                                      f"over x-input-validation env.max_length {rule['max_length']}")
                if "max_total_length" in rule and len(value) > rule["max_total_length"]:
                    errors.append(f"{where}: env is {len(value)} characters, over max_total_length")
            elif isinstance(value, str) and "max_length" in rule and len(value) > rule["max_length"]:
                errors.append(f"{where}: {key} is {len(value)} characters, over x-input-validation max_length "
                              f"{rule['max_length']}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if "min" in rule and value < rule["min"]:
                    errors.append(f"{where}: {key}={value} is under x-input-validation min {rule['min']}")
                if "max" in rule and value > rule["max"]:
                    errors.append(f"{where}: {key}={value} is over x-input-validation max {rule['max']}")
            elif isinstance(value, dict) and key == "env":
                errors.append(f"{where}: env is an object; the spec documents a string of Docker flags")
        if "args" in limits and isinstance(body.get("args"), list):
            total = sum(len(a) for a in body["args"]) + len(body.get("args_str") or "") + len(body.get("onstart") or "")
            if total > limits["args"].get("max_length", 1 << 30):
                errors.append(f"{where}: args+args_str+onstart is {total} characters, over max_length")
        return errors

    # ------------------------------------------------------------ response

    def check_response(self, method: str, path: str, status: int, content_type: str, body: Any,
                       *, allow_undocumented: frozenset[int] = frozenset()) -> list[str]:
        op = self.operation(method, path)
        where = f"{self.name} {method} {path} -> {status}"
        if op is None:
            return [f"{where}: no such operation in the spec"]
        responses = op.op.get("responses") or {}
        resp = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
        if resp is None:
            if status in allow_undocumented:
                return []
            resp = responses.get("default")
            if resp is None:
                return [f"{where}: status {status} is not documented for this operation "
                        f"(documented: {sorted(responses)})"]
        resp = op.doc.resolve(resp)
        content = resp.get("content") or {}
        if body is None or body == b"" or body == "":
            return [] if not content or status == 204 else [f"{where}: empty body; the spec documents {list(content)}"]
        if not content:
            return [f"{where}: a body where the spec documents none"]
        ctype = content_type.split(";")[0].strip()
        media = content.get(ctype)
        if media is None:
            return [f"{where}: content type {ctype!r}; the spec documents {list(content)}"]
        if not media.get("schema"):
            return []
        return op.doc.errors(media["schema"], body, f"{where} body")

    def check(self, exchanges: list[tuple[Any, Any]], *, allow_undocumented: frozenset[int] = frozenset()
              ) -> list[str]:
        """Every recorded (Request, Response) pair of a fake, against this spec."""
        errors: list[str] = []
        for req, resp in exchanges:
            path = req.path[len(self.prefix):] if self.prefix and req.path.startswith(self.prefix) else req.path
            ctype = req.headers.get("content-type", "application/json")
            errors += self.check_request(req.method, path, req.query, req.json if req.body else None, ctype)
            body = resp.body
            if isinstance(body, (bytes, str)) and body:
                try:
                    body = json.loads(body)
                except ValueError:
                    pass
            errors += self.check_response(req.method, path, resp.status, resp.content_type, body,
                                          allow_undocumented=allow_undocumented)
        return errors


def split_docker_env(value: str) -> list[str]:
    """The KEY=VALUE entries of a Docker-flag env string (`-e K=V -e K2="a b"`), quotes kept off."""
    tokens, cur, quote = [], [], None
    for ch in value:
        if quote:
            if ch == quote:
                quote = None
            else:
                cur.append(ch)
        elif ch in "\"'":
            quote = ch
        elif ch == " ":
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] == "-e" and i + 1 < len(tokens):
            out.append(tokens[i + 1])
            i += 2
        elif tokens[i] in ("-p", "-h", "-v", "-n") and i + 1 < len(tokens):
            i += 2
        else:
            i += 1
    return out


def parse_docker_env(value: str) -> dict[str, str]:
    return dict(e.split("=", 1) for e in split_docker_env(value) if "=" in e)


# ---------------------------------------------------------------- the three providers


@functools.cache
def runpod_spec() -> ApiSpec:
    return ApiSpec("runpod", [ApiSpecDoc(specs_dir() / "runpod" / "openapi-v2.json")])


@functools.cache
def lambda_spec() -> ApiSpec:
    return ApiSpec("lambda", [ApiSpecDoc(specs_dir() / "lambda" / "openapi.json")])


VAST_ENDPOINTS = ("search_offers", "create_instance", "show_instance", "show_instances", "destroy_instance")


@functools.cache
def vast_spec() -> ApiSpec:
    """The per-endpoint files: they keep the rate limits and `x-input-validation` the combined file drops."""
    base = specs_dir() / "vast" / "endpoints"
    return ApiSpec("vast", [ApiSpecDoc(base / f"{n}.yaml") for n in VAST_ENDPOINTS])


def schema_of(spec: ApiSpec, name: str) -> tuple[ApiSpecDoc, dict[str, Any]]:
    """A named component schema (first document that has it)."""
    for d in spec.docs:
        s = ((d.doc.get("components") or {}).get("schemas") or {}).get(name)
        if s is not None:
            return d, s
    raise KeyError(name)


def validate_schema(spec: ApiSpec, name: str, instance: Any) -> list[str]:
    doc, schema = schema_of(spec, name)
    return doc.errors({"$ref": f"#/components/schemas/{name}"}, instance, f"{spec.name} {name}")
