"""A loopback HTTP proxy in front of moto_server that plays EC2's failures moto cannot.

moto always has capacity and never reclaims a spot instance. This proxy forwards every request to
moto unchanged, except:
- `RunInstances` matching a capacity rule (zone and/or instance type) is answered with EC2's real
  error: HTTP 500 and the `<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code>...`
  XML body EC2 sends (the shape botocore parses; seen verbatim in public bug reports);
- `DescribeInstances` naming an instance RunInstances just returned can be answered with
  `InvalidInstanceID.NotFound` (HTTP 400) for its first N calls (`hide_new_instances`): EC2's
  eventual consistency ("Eventual consistency in the Amazon EC2 API" in the EC2 API reference);
- `DescribeInstances` replies for a "preempted" instance are rewritten to what EC2 shows after a
  spot interruption: state shutting-down/terminated with StateReason Server.SpotInstanceTermination;
- `RunInstances` keeps EC2's idempotency ("Ensuring idempotency of EC2 API requests"): a repeat with
  the ClientToken of a request that succeeded answers that request's instances and launches nothing
  (moto stores the token but launches again);
- a fault plan (`fault` / `apply`, the format every fake shares; tests/_faults_util.py) fails an
  operation with EC2's XML error: create = RunInstances, status = DescribeInstances by InstanceId,
  list = DescribeInstances by filter, terminate = TerminateInstances, search = DescribeSpotPriceHistory;
  `after_effect` forwards to moto first (the instance exists, the answer is a 500).

The adapter talks to it over real HTTP with boto3 (endpoint_url=proxy.url), so the whole botocore
stack (signing, retries, XML parsing, error classes) is exercised; nothing in cloudtune is patched.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

import httpx

from tests.fakes.server import FakeServer, Request, Response, route

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
_STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
_MESSAGES = {
    "InsufficientInstanceCapacity": "We currently do not have sufficient {itype} capacity in the Availability Zone "
                                    "you requested ({zone}). Our system will be working on provisioning additional "
                                    "capacity. You can currently get {itype} capacity by not specifying an "
                                    "Availability Zone in your request or choosing other zones.",
    "InsufficientCapacity": "Insufficient capacity.",
    "UnfulfillableCapacity": "There is no Spot capacity available that matches your request.",
    "SpotMaxPriceTooLow": "Your Spot request price of 0.001 is lower than the minimum required Spot request "
                          "fulfillment price of 0.5.",
    "MaxSpotInstanceCountExceeded": "Max spot instance count exceeded",
    "VcpuLimitExceeded": "You have requested more vCPU capacity than your current vCPU limit of 0 allows for the "
                         "instance bucket that the specified instance type belongs to.",
    "RequestLimitExceeded": "Request limit exceeded.",
    "UnauthorizedOperation": "You are not authorized to perform this operation.",
    "InternalError": "An internal error has occurred",
    "Unsupported": "The requested configuration is currently not supported. Please check the documentation for "
                   "supported configurations.",
    "InvalidInstanceID.NotFound": "The instance ID '{iid}' does not exist",
}
_CLIENT_SIDE = {"VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "UnauthorizedOperation",
                "RequestLimitExceeded", "Unsupported"}


@dataclass
class CapacityRule:
    code: str
    zone: str | None  # None: any zone
    instance_type: str | None  # None: any type
    times: int  # how many matching requests to fail; -1: all


def ec2_error_xml(code: str, message: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    )


# EC2's error code and HTTP status for a planned fault of a given status (throttling is a 503 in EC2).
_DEFAULT_FAULT_CODES = {500: "InternalError", 503: "Unavailable", 429: "RequestLimitExceeded", 400: "InvalidParameterValue"}
_FAULT_ACTIONS = {"create": "RunInstances", "status": "DescribeInstances", "list": "DescribeInstances",
                  "terminate": "TerminateInstances", "search": "DescribeSpotPriceHistory"}


@dataclass
class ActionFault:
    op: str
    action: str
    status: int
    code: str | None
    after_effect: bool
    times: int
    delay_s: float
    reset: bool

    def matches(self, action: str, form: dict[str, str]) -> bool:
        if self.times <= 0 or action != self.action:
            return False
        by_id = any(k.startswith("InstanceId.") for k in form)
        return {"status": by_id, "list": not by_id}.get(self.op, True)


class EC2CapacityProxy(FakeServer):
    FAULT_ROUTES = {op: ("POST", r"/.*") for op in _FAULT_ACTIONS}

    def __init__(self, upstream: str) -> None:
        super().__init__(api_key=None)
        self.upstream = upstream.rstrip("/")
        self.rules: list[CapacityRule] = []
        self.preempted: dict[str, str] = {}  # instance id -> state to show
        self.run_instances_calls: list[dict[str, str]] = []
        self.describe_calls: list[dict[str, str]] = []
        self._hide_new = 0  # DescribeInstances NotFound answers per newly launched instance
        self._hidden: dict[str, int] = {}  # instance id -> NotFound answers left
        self._http = httpx.Client(timeout=30)
        self.action_faults: list[ActionFault] = []
        self._tokens: dict[str, bytes] = {}  # ClientToken -> the RunInstances answer it got

    def on_stop(self) -> None:
        self._http.close()

    # ------------------------------------------------------------ test controls

    def fail_run_instances(self, code: str = "InsufficientInstanceCapacity", *, zone: str | None = None,
                           instance_type: str | None = None, times: int = -1) -> None:
        with self.lock:
            self.rules.append(CapacityRule(code, zone, instance_type, times))

    def hide_new_instances(self, times: int) -> None:
        """Answer the first `times` DescribeInstances naming each instance launched from now on with
        InvalidInstanceID.NotFound, and leave it out of the first `times` filtered DescribeInstances
        (by tag, state) that would list it, as EC2 may for a while after RunInstances."""
        with self.lock:
            self._hide_new = times

    def fault(self, op: str, *, status: int = 500, after_effect: bool = False, times: int = 1,
              delay_s: float = 0.0, reset: bool = False, code: str | None = None,
              retry_after: float | None = None) -> None:
        """A fault plan entry (see FakeServer.fault); EC2 sends no Retry-After, so it is ignored."""
        if op not in _FAULT_ACTIONS:
            raise ValueError(f"EC2CapacityProxy has no fault route for op {op!r}")
        with self.lock:
            self.action_faults.append(ActionFault(op, _FAULT_ACTIONS[op], status, code, after_effect, times,
                                                  delay_s, reset))

    def clear_faults(self) -> None:
        with self.lock:
            self.action_faults.clear()
            self._faults.clear()

    def _fault_answer(self, fault: ActionFault) -> Response:
        if fault.reset:
            return Response(0, reset=True)
        code = fault.code or _DEFAULT_FAULT_CODES.get(fault.status, "InternalError")
        message = _MESSAGES.get(code, code)
        return Response(fault.status, ec2_error_xml(code, message), content_type="text/xml;charset=UTF-8")

    def live_instances(self) -> list[str]:
        """Instance ids moto holds in a state that bills (pending/running/stopping/stopped), all regions
        of this test's account: what "nothing leaked" is checked against."""
        import boto3

        ec2 = boto3.client("ec2", endpoint_url=self.upstream, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        out = []
        for res in ec2.describe_instances(Filters=[{"Name": "instance-state-name",
                                                    "Values": ["pending", "running", "stopping", "stopped"]}])[
                "Reservations"]:
            out.extend(i["InstanceId"] for i in res["Instances"])
        return out

    def secret_parameters(self, prefix: str = "/cloudtune/") -> list[str]:
        """Names of the SSM parameters under `prefix` that moto holds (the machines' secrets)."""
        import boto3

        ssm = boto3.client("ssm", endpoint_url=self.upstream, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        found = ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Option": "BeginsWith", "Values": [prefix]}])
        return [p["Name"] for p in found.get("Parameters", [])]

    def preempt(self, instance_id: str, state: str = "shutting-down") -> None:
        """Show `instance_id` as reclaimed by EC2 (moto itself keeps it running)."""
        with self.lock:
            self.preempted[instance_id] = state

    # ------------------------------------------------------------ proxying

    @route("POST", r"/.*")
    def post(self, req: Request) -> Response:
        import time

        form = {k: v[0] for k, v in parse_qs(req.body.decode(), keep_blank_values=True).items()}
        action = form.get("Action", "")
        token = form.get("ClientToken") if action == "RunInstances" else None
        with self.lock:
            if action == "RunInstances":
                self.run_instances_calls.append(form)
            planned = next((f for f in self.action_faults if f.matches(action, form)), None)
            if planned is not None:
                planned.times -= 1
        if planned is not None:
            if planned.after_effect:
                self._effect(req, token)
            if planned.delay_s:
                time.sleep(planned.delay_s)
            return self._fault_answer(planned)
        with self.lock:
            known = self._tokens.get(token) if token else None
        if known is not None:  # EC2 idempotency: the first answer again, nothing launched
            return Response(200, known, content_type="text/xml;charset=UTF-8")
        if action == "RunInstances":
            with self.lock:
                zone = form.get("Placement.AvailabilityZone")
                itype = form.get("InstanceType")
                rule = next((r for r in self.rules if r.times != 0 and r.zone in (None, zone)
                             and r.instance_type in (None, itype)), None)
                if rule is not None and rule.times > 0:
                    rule.times -= 1
            if rule is not None:
                status = 400 if rule.code in _CLIENT_SIDE else (503 if rule.code == "RequestLimitExceeded" else 500)
                message = _MESSAGES.get(rule.code, rule.code).format(itype=itype, zone=zone)
                return Response(status, ec2_error_xml(rule.code, message), content_type="text/xml;charset=UTF-8")
        if action == "DescribeInstances":
            ids = [v for k, v in form.items() if k.startswith("InstanceId.")]
            with self.lock:
                self.describe_calls.append(form)
                hidden = next((i for i in ids if self._hidden.get(i, 0) > 0), None)
                if hidden is not None:
                    self._hidden[hidden] -= 1
            if hidden is not None:
                message = _MESSAGES["InvalidInstanceID.NotFound"].format(iid=hidden)
                return Response(400, ec2_error_xml("InvalidInstanceID.NotFound", message),
                                content_type="text/xml;charset=UTF-8")
        resp = self._forward(req)
        if action == "RunInstances" and resp.status == 200:
            self._launched(token, resp.body)
        if action == "DescribeInstances" and resp.status == 200 and not any(k.startswith("InstanceId.") for k in form):
            resp.body = self._hide_from_listing(resp.body)
        if action == "DescribeInstances" and self.preempted and resp.status == 200:
            resp.body = self._rewrite_preempted(resp.body)
        return resp

    def _launched(self, token: str | None, body: bytes) -> None:
        """A RunInstances that succeeded upstream: remember its answer (idempotency) and hide its instances."""
        with self.lock:
            if token:
                self._tokens[token] = body
            if self._hide_new:
                for iid in re.findall(rb"<instanceId>(i-[0-9a-f]+)</instanceId>", body):
                    self._hidden[iid.decode()] = self._hide_new

    def _hide_from_listing(self, body: bytes) -> bytes:
        """Drop the still-invisible instances from a filtered DescribeInstances answer."""
        with self.lock:
            if not any(n > 0 for n in self._hidden.values()):
                return body
        ET.register_namespace("", EC2_NS)
        root = ET.fromstring(body)
        ns = {"e": EC2_NS}
        changed = False
        for rset in root.iterfind("e:reservationSet", ns):
            for res in list(rset):
                iset = res.find("e:instancesSet", ns)
                if iset is None:
                    continue
                for inst in list(iset):
                    iid = inst.findtext("e:instanceId", namespaces=ns) or ""
                    with self.lock:
                        hide = self._hidden.get(iid, 0) > 0
                        if hide:
                            self._hidden[iid] -= 1
                    if hide:
                        iset.remove(inst)
                        changed = True
                if len(iset) == 0:
                    rset.remove(res)
        if not changed:
            return body
        return re.sub(rb"^<\?xml[^>]*\?>", b"", ET.tostring(root, encoding="utf-8")).strip()

    def _effect(self, req: Request, token: str | None) -> None:
        """What EC2 does with a request whose answer is then lost: the action, idempotent by ClientToken."""
        with self.lock:
            if token and token in self._tokens:
                return
        done = self._forward(req)
        if done.status == 200:
            self._launched(token, done.body)

    @route("GET", r"/.*")
    def get(self, req: Request) -> Response:
        return self._forward(req)

    def _forward(self, req: Request) -> Response:
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "content-length", "connection")}
        query = urlencode(req.query, doseq=True)
        url = f"{self.upstream}{req.path}" + (f"?{query}" if query else "")
        upstream = self._http.request(req.method, url, content=req.body, headers=headers)
        return Response(upstream.status_code, upstream.content,
                        content_type=upstream.headers.get("content-type", "text/xml"))

    def _rewrite_preempted(self, body: bytes) -> bytes:
        ET.register_namespace("", EC2_NS)
        root = ET.fromstring(body)
        ns = {"e": EC2_NS}
        for inst in root.iterfind(".//e:instancesSet/e:item", ns):
            iid = inst.findtext("e:instanceId", namespaces=ns)
            with self.lock:
                state = self.preempted.get(iid or "")
            if state is None:
                continue
            st = inst.find("e:instanceState", ns)
            if st is not None:
                st.find("e:code", ns).text = str(_STATE_CODES[state])  # type: ignore[union-attr]
                st.find("e:name", ns).text = state  # type: ignore[union-attr]
            reason = inst.find("e:stateReason", ns)
            if reason is None:
                reason = ET.SubElement(inst, f"{{{EC2_NS}}}stateReason")
            for child in list(reason):
                reason.remove(child)
            ET.SubElement(reason, f"{{{EC2_NS}}}code").text = "Server.SpotInstanceTermination"
            ET.SubElement(reason, f"{{{EC2_NS}}}message").text = (
                "Server.SpotInstanceTermination: Spot instance termination"
            )
        return re.sub(rb"^<\?xml[^>]*\?>", b"", ET.tostring(root, encoding="utf-8")).strip()
