"""Modal: what cloudtune would create, built offline and checked against the real `modal` SDK."""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
import sys
from importlib import resources

import modal
import pytest
from cloudtune.providers import get_provider
from cloudtune.providers.base import AuthError, InvalidRequestError, LaunchRequest, Offer
from cloudtune.providers.modal import ModalProvider, SdkModalClient
from cloudtune.providers.modal_app import (
    MAX_TIMEOUT_S,
    TAG_CAP,
    build_definition,
    modal_gpu,
    sandbox_kwargs,
)
from modal._utils.function_utils import parse_gpu_config

SECRET = "AKIA-very-secret-value-42"
# modal.com/docs/guide/gpu (../shared/providers.md section 4); the SDK's parser checks only the format.
MODAL_DOCUMENTED_GPUS = {"T4", "L4", "A10", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100",
                         "H100!", "H200", "B200", "B200+"}


def request(gpu="H100-SXM", count=1, lifetime=None, store="s3://bucket/jobs", **kw) -> LaunchRequest:
    return LaunchRequest(
        job_id="abcd2345",
        attempt=kw.pop("attempt", 1),
        offer=Offer("modal", f"modal-x-{count}x", gpu, count, 80, "auto", price_hr=3.9492 * count),
        spot=kw.pop("spot", False),
        image="ghcr.io/example/cloudtune-trainer:0.1",
        command=["python", "-m", "cloudtune.trainer"],
        env={"CLOUDTUNE_JOB_ID": "abcd2345", "CLOUDTUNE_STORE": store},
        secret_env={"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": "hf_" + SECRET},
        max_lifetime_s=lifetime,
        **kw,
    )


@pytest.fixture(autouse=True)
def _no_modal_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "no-modal.toml"))


def test_every_catalog_modal_offer_maps_to_a_gpu_string_the_sdk_accepts():
    with resources.files("cloudtune").joinpath("data/offers.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["provider"] == "modal"]
    assert len(rows) == 36
    for row in rows:
        gpu = modal_gpu(row["gpu"], int(row["gpu_count"]))
        cfg = parse_gpu_config(gpu)  # the SDK's own parser: raises on a malformed string
        assert cfg.gpu_type in MODAL_DOCUMENTED_GPUS and cfg.count == int(row["gpu_count"])
    assert modal_gpu("H100-SXM", 8) == "H100:8"
    assert modal_gpu("A100-80GB", 1) == "A100-80GB"
    assert modal_gpu("RTXPRO6000", 1) == "RTX-PRO-6000"


def test_gpu_counts_and_names_modal_cannot_run_are_rejected():
    with pytest.raises(InvalidRequestError, match="1..4"):
        modal_gpu("A10", 8)
    with pytest.raises(InvalidRequestError, match="not offered on Modal"):
        modal_gpu("V100", 1)


def test_definition_gpu_timeout_command_env_tags():
    defn = build_definition(request(count=8, lifetime=3 * 3600))
    assert defn.gpu == "H100:8"
    assert defn.timeout_s == 3 * 3600 and defn.tags[TAG_CAP] == "job"
    assert defn.cpu == 32 and defn.memory_mib == 8 * 32 * 1024
    assert defn.name == "cloudtune-abcd2345-1"
    assert defn.tags == {"cloudtune:job": "abcd2345", "cloudtune:attempt": "1", "cloudtune:managed": "true",
                         "cloudtune:cap": "job"}
    # the trainer gets SIGTERM 10 min before the hard limit, SIGKILL 2 min later
    assert defn.command == ("timeout", "--preserve-status", "--signal=TERM", "--kill-after=120s",
                            f"{3 * 3600 - 600}s", "python", "-m", "cloudtune.trainer")
    assert defn.env == {"CLOUDTUNE_JOB_ID": "abcd2345", "CLOUDTUNE_STORE": "s3://bucket/jobs"}
    assert defn.secret_keys == ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN")


def test_timeout_is_capped_at_modals_24_hours_and_marked_for_chaining():
    for lifetime in (None, 3 * 24 * 3600):
        defn = build_definition(request(lifetime=lifetime))
        assert defn.timeout_s == MAX_TIMEOUT_S == 86400
        assert defn.tags[TAG_CAP] == "attempt-limit"


def test_local_file_store_spot_and_short_lifetimes_are_clear_errors():
    with pytest.raises(InvalidRequestError, match="s3://"):
        build_definition(request(store="file:///home/me/.cloudtune/store"))
    with pytest.raises(InvalidRequestError, match="no spot tier"):
        build_definition(request(spot=True))
    with pytest.raises(InvalidRequestError, match="too short"):
        build_definition(request(lifetime=1))


def test_sdk_objects_are_built_offline_and_bind_to_sandbox_create():
    defn = build_definition(request(count=2))
    kwargs = sandbox_kwargs(defn, {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": "hf_" + SECRET})
    inspect.signature(modal.Sandbox.create).bind(*defn.command, app=object(), **kwargs)
    assert isinstance(kwargs["image"], modal.Image)
    assert len(kwargs["secrets"]) == 1 and isinstance(kwargs["secrets"][0], modal.Secret)
    assert kwargs["gpu"] == "H100:2" and kwargs["timeout"] == 86400
    assert SECRET not in json.dumps({k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, dict))})
    with pytest.raises(InvalidRequestError, match="missing"):
        sandbox_kwargs(defn, {"HF_TOKEN": "x"})


def test_image_from_requirements_and_named_secrets(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("trl==1.16\npeft==0.21\n")
    p = ModalProvider(image_requirements=str(reqs), secret_names=["aws-cloudtune"], registry_secret=None)
    defn = p.definition(request())
    assert defn.image.kind == "build" and defn.image.ref == str(reqs)
    kwargs = sandbox_kwargs(defn, {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": "t"})
    assert isinstance(kwargs["image"], modal.Image)
    assert len(kwargs["secrets"]) == 2
    with pytest.raises(InvalidRequestError, match="does not exist"):
        ModalProvider(image_requirements=str(tmp_path / "nope.txt")).definition(request())


def test_describe_launch_shows_the_definition_without_secrets():
    out = get_provider("modal").describe_launch(request(lifetime=7200))
    text = json.dumps(out)
    assert SECRET not in text
    d = out[0]
    assert d["call"] == "modal.Sandbox.create" and d["gpu"] == "H100" and d["timeout"] == 7200
    assert d["image"] == "modal.Image.from_registry('ghcr.io/example/cloudtune-trainer:0.1')"
    assert d["secrets"] == ["modal.Secret.from_dict({'AWS_SECRET_ACCESS_KEY': ***, 'HF_TOKEN': ***})"]
    assert "per second" in d["note"]


def test_offers_add_cpu_and_memory_at_sandbox_rates_to_the_per_second_gpu_rate():
    offers = {(o.offer_id): o for o in ModalProvider().offers()}
    assert len(offers) == 36
    h100 = offers["modal-h100-1x"]
    # GPU 0.001097 $/s, + 4 cores x $0.00003942 + 32 GiB x $0.00000672 per second: modal.com/pricing's
    # "Sandboxes & Notebooks" rates, not the Function rates ($0.0000131, $0.00000222)
    assert h100.price_hr == pytest.approx(3.9492 + 3600 * (4 * 0.00003942 + 32 * 0.00000672), abs=1e-3)
    assert h100.price_hr > 3.9492 + 3600 * (4 * 0.0000131 + 32 * 0.00000222) + 0.5
    assert h100.gpu == "H100-SXM" and h100.billing_granularity_s == 1 and h100.spot_price_hr is None
    assert offers["modal-h100-8x"].price_hr == pytest.approx(8 * h100.price_hr, abs=1e-3)
    assert (h100.vcpus, h100.ram_gb) == (4, 32.0)


def test_missing_credentials_fail_before_any_sdk_call():
    p = ModalProvider()
    with pytest.raises(AuthError, match="MODAL_TOKEN_ID"):
        p.status("sb-123")


def test_credentials_select_the_real_sdk_client(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    assert isinstance(ModalProvider().client, SdkModalClient)


def test_importing_the_adapter_does_not_import_the_sdk():
    code = ("import sys, cloudtune.providers.modal, cloudtune.providers.modal_app; "
            "assert 'modal' not in sys.modules, 'modal imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_pinned_region_multiplies_the_whole_price():
    base = {o.offer_id: o.price_hr for o in ModalProvider().offers()}
    us = {o.offer_id: o for o in ModalProvider(region="us-east").offers()}
    other = {o.offer_id: o for o in ModalProvider(region="sa-east").offers()}
    # modal.com/docs/guide/region-selection: 1.25x in US/EU/AP, 2.5x elsewhere, on GPU + CPU + memory
    assert us["modal-h100-1x"].price_hr == pytest.approx(1.25 * base["modal-h100-1x"], abs=1e-3)
    assert other["modal-h100-1x"].price_hr == pytest.approx(2.5 * base["modal-h100-1x"], abs=1e-3)
    assert us["modal-h100-1x"].region == "us-east"
    from cloudtune.providers.modal_pricing import region_multiplier

    assert region_multiplier(["us-east", "sa-east"]) == 1.25 and region_multiplier(None) == 1.0


def test_lost_statuses_are_real_sdk_statuses_and_are_read_from_a_polled_sandbox():
    from cloudtune.providers.modal import LOST_STATUSES
    from modal.sandbox._common import _result_returncode
    from modal_proto import api_pb2

    names = {n.removeprefix("GENERIC_STATUS_") for n in api_pb2.GenericResult.GenericStatus.keys()}
    assert LOST_STATUSES <= names
    for status in LOST_STATUSES:  # the SDK's returncode hides them as exit code 0
        result = api_pb2.GenericResult(status=api_pb2.GenericResult.GenericStatus.Value(f"GENERIC_STATUS_{status}"))
        assert _result_returncode(result) == 0

        class Impl:  # where modal 1.x's Sandbox keeps the result poll() read (sandbox/_sandbox.py)
            pass

        impl = Impl()
        impl.result = result

        class Polled:
            _impl = impl

        assert SdkModalClient.result_status(Polled()) == status
    # ... and the installed SDK really keeps it there: returncode is computed from `self._impl.result`
    from modal.sandbox._sandbox import _Sandbox

    assert "_result_returncode(self._impl.result)" in inspect.getsource(_Sandbox.returncode.fget)
