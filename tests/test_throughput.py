"""The time model: FLOPs per token, its parts, and its calibration against measured throughput."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from cloudtune.catalog import gpu_specs
from cloudtune.errors import DataError
from cloudtune.planner import throughput as tp
from cloudtune.planner.dataset_stats import CHARS_PER_TOKEN, TEMPLATE_TOKENS_PER_RECORD, dataset_stats
from cloudtune.planner.types import ModelArch, TrainConfig

DATA = Path(__file__).resolve().parent / "data" / "throughput_measured.csv"

LLAMA8B = ModelArch(id="llama-8b", params_b=8.03, layers=32, hidden=4096, intermediate=14336, heads=32,
                    kv_heads=8, head_dim=128, vocab=128256, tied_embeddings=False)
MIXTRAL = ModelArch(id="mixtral", params_b=46.7, layers=32, hidden=4096, intermediate=14336, heads=32,
                    kv_heads=8, head_dim=128, vocab=32000, tied_embeddings=False, num_experts=8,
                    experts_per_token=2)


def test_flops_per_token_by_method_and_recompute():
    p = tp.matmul_params(LLAMA8B)
    assert p == pytest.approx(8.03e9 - 128256 * 4096)  # the input embedding is a lookup
    attn = 2 * 32 * 1024 * 4096
    assert tp.flops_per_token(LLAMA8B, "full", False, 1024) == pytest.approx(6 * p + 3 * attn)
    assert tp.flops_per_token(LLAMA8B, "full", True, 1024) == pytest.approx(8 * p + 4 * attn)
    assert tp.flops_per_token(LLAMA8B, "lora", False, 1024) == pytest.approx(4 * p + 3 * attn)
    assert tp.flops_per_token(LLAMA8B, "qlora", True, 1024) == pytest.approx(6 * p + 4 * attn)
    # attention grows with the context, the matmul part does not
    assert tp.flops_per_token(LLAMA8B, "lora", True, 8192) > tp.flops_per_token(LLAMA8B, "lora", True, 1024)


def test_moe_counts_active_experts_only():
    active = tp.matmul_params(MIXTRAL)
    inactive = 6 * 32 * 3 * 4096 * 14336
    assert active == pytest.approx(46.7e9 - inactive - 32000 * 4096)
    assert 12e9 < active < 14e9  # Mixtral-8x7B: ~12.9 B active


def _est(arch=LLAMA8B, gpu="A100-80GB", **kw):
    cfg = kw.pop("cfg", TrainConfig(method="lora", seq_len=2048, micro_batch=4))
    work = kw.pop("work", tp.Workload(10_000, 2048))
    return tp.estimate_time(arch, cfg, work, gpu_specs()[gpu], **kw)


def test_workload_tokens_truncate_at_seq_len():
    w = tp.Workload(1000, 3000, 2.0)
    assert w.total_tokens(2048) == 1000 * 2048 * 2
    assert w.to_dict(4096)["tokens"] == 6_000_000


def test_time_scales_with_tokens_and_gpu_speed():
    one = _est()
    two = _est(work=tp.Workload(20_000, 2048))
    assert two.train_hours == pytest.approx(2 * one.train_hours, rel=0.01)
    h100 = _est(gpu="H100-SXM")
    assert h100.train_hours < one.train_hours  # more peak even at a lower HFU
    assert h100.hfu < one.hfu


def test_gpu_without_tflops_is_not_guessed():
    blank = replace(gpu_specs()["RTX5880-Ada"], bf16_tflops=None, fp16_tflops=None)  # a live row without one
    est = tp.estimate_time(LLAMA8B, TrainConfig(), tp.Workload(100, 512), blank)
    assert not est.ok and "TFLOPS" in est.reason


def test_every_catalog_gpu_has_a_sourced_dense_figure():
    """Every GPU an offer names has a dense tensor figure, and its source says where it came from."""
    import csv

    from cloudtune.catalog import load_offers

    rows = {r["gpu"]: r for r in csv.DictReader((Path(tp.__file__).parents[1] / "data" / "gpus.csv").open())}
    specs = gpu_specs()
    for gpu in {o.gpu for o in load_offers(None)} | set(specs):
        assert specs[gpu].peak_tflops, gpu
        assert len(rows[gpu]["source"]) > 40, gpu
    # the five figures derived in #15: SMs x FLOPs/SM/clock x boost clock, cross-checked with NVIDIA's AI TOPS
    assert specs["RTX5880-Ada"].peak_tflops == pytest.approx(110 * 1024 * 2.46e9 / 1e12, rel=0.01)
    assert specs["RTX4070"].peak_tflops == pytest.approx(66 * 512 * 2.61e9 / 1e12, rel=0.01)
    assert specs["RTX4060"].peak_tflops == pytest.approx(34 * 512 * 2.535e9 / 1e12, rel=0.01)
    assert specs["RTX3060"].peak_tflops == pytest.approx(38 * 512 * 1.665e9 / 1e12, rel=0.01)
    assert specs["RTX5070"].peak_tflops == pytest.approx(48 * 512 * 2.51e9 / 1e12, rel=0.01)
    assert tp.gpu_class(specs["RTX5880-Ada"]) == "ada"  # workstation: full-rate FP32 accumulate
    assert tp.gpu_class(specs["RTX4060"]) == "geforce"


# The figures vendors print *with 2:4 sparsity* (or, for GeForce cards, with FP16 accumulate), which a dense
# bf16 column must never hold: datasheets, the Ada/GA102/RTX Blackwell whitepapers, the MI300X data sheet.
SPARSE_OR_FP16_ACC = {
    "H100-SXM": (1979,), "H100-80GB": (1513,), "H100-NVL": (1671,), "H200": (1979,), "GH200": (1979,),
    "B200": (4500,), "B300": (4500,), "A100-80GB": (624,), "A100-40GB": (624,), "L40S": (733,), "L40": (362.1,),
    "L4": (242,), "A10": (250,), "A10G": (140, 280), "A6000": (309.7,), "A5000": (222.2,), "RTX6000-Ada": (728.5, 1457),
    "RTX5880-Ada": (554.2, 1108.4), "RTX4090": (330.3, 660.6, 1321), "RTX3090": (142, 284), "RTX5090": (419, 838, 3352),
    "RTX4070": (176.5, 706), "RTX4060": (88.2, 353), "RTX3060": (64.8, 129.6), "RTX5070": (123.5, 988),
    "RTXPRO6000": (1007.6, 4000), "MI300X": (2614.9,),
}


def test_every_gpu_row_has_a_source_url_and_a_dense_not_sparse_figure():
    rows = list(csv.DictReader((Path(tp.__file__).parents[1] / "data" / "gpus.csv").open()))
    specs = gpu_specs()
    for r in rows:
        urls = r["source_url"].split()
        assert urls and all(u.startswith("https://") for u in urls), r["gpu"]
        assert "without re-fetching" not in r["source"], r["gpu"]  # #15: the five transcribed rows are checked
        peak = specs[r["gpu"]].peak_tflops
        for sparse in SPARSE_OR_FP16_ACC.get(r["gpu"], ()):
            assert abs(peak - sparse) > 0.02 * sparse, (r["gpu"], peak, sparse)
    assert {r["gpu"] for r in rows if r["bf16_supported"] == "true"} <= set(SPARSE_OR_FP16_ACC)
    assert specs["H100-SXM"].peak_tflops == pytest.approx(989, rel=0.01)  # not 1979 (with sparsity)
    assert specs["A100-80GB"].peak_tflops == pytest.approx(312, rel=0.01)  # not 624
    assert specs["RTX4090"].peak_tflops == pytest.approx(165.2, rel=0.01)  # FP32 accumulate, not 330.3


def test_hfu_class_of_the_newly_filled_gpus():
    """The HFU class must match what the gpus.csv peak means: the A10G's 70 TFLOPS is the GeForce-style
    half-rate FP32-accumulate figure (like the 3090's 71), the RTX PRO 6000's 503.8 is full rate."""
    specs = gpu_specs()
    assert tp.gpu_class(specs["A10G"]) == tp.gpu_class(specs["RTX3090"]) == "geforce"
    assert tp.gpu_class(specs["A10"]) == "ampere"  # full-rate datasheet figure, datacenter HFU
    assert tp.gpu_class(specs["RTX5090"]) == "geforce"
    assert tp.gpu_class(specs["RTXPRO6000"]) == tp.gpu_class(specs["B300"]) == "blackwell"
    assert tp.gpu_class(specs["RTX6000-Ada"]) == "ada"  # workstation, not GeForce


def test_a10g_time_sits_between_l4_and_a100_for_8b_qlora():
    q = TrainConfig(method="qlora", quant_bits=4, seq_len=2048, micro_batch=1)
    work = tp.Workload(10_000, 1024)
    hours = {g: _est(gpu=g, cfg=q, work=work).train_hours for g in ("L4", "A10G", "A10", "A100-40GB", "RTX3090")}
    assert hours["A100-40GB"] < hours["A10"] < hours["A10G"]
    # at 1024 tokens per micro-step both the A10G and the L4 run far below their peak (small-step efficiency)
    assert 0.9 < hours["A10G"] / hours["L4"] < 1.1
    # same GA102 die and rate as the 3090, fewer SMs and less bandwidth: a little slower, not a lot
    assert 1.0 < hours["A10G"] / hours["RTX3090"] < 1.3
    a10g = _est(gpu="A10G", cfg=q, work=work)
    assert a10g.ok and a10g.hfu == pytest.approx(tp.HFU_BY_CLASS["geforce"] * 1024 / (1024 + 512))
    # QLoRA's dequant is bandwidth-bound: 600 GB/s on the A10G against 300 on the L4
    assert a10g.dequant_s_per_step == pytest.approx(_est(gpu="L4", cfg=q, work=work).dequant_s_per_step / 2)


def test_small_micro_steps_run_below_peak_on_geforce_class_cards():
    """#15: the A10G's effective utilisation on 150-500-token LoRA steps is ~20-30%, not 65%; A100 rows
    (QW-01 at 256 tokens) need no such term."""
    lora = TrainConfig(method="lora", seq_len=300, micro_batch=1)
    a10g = _est(gpu="A10G", cfg=lora, work=tp.Workload(1000, 300))
    assert 0.20 <= a10g.hfu <= 0.30
    big = _est(gpu="A10G", cfg=replace(lora, seq_len=4096, micro_batch=4), work=tp.Workload(1000, 4096))
    assert big.hfu > 0.6
    a100 = _est(gpu="A100-80GB", cfg=lora, work=tp.Workload(1000, 300))
    assert a100.hfu == pytest.approx(tp.HFU_BY_CLASS["ampere"])


def test_eager_attention_and_offload_reach_the_time_model():
    lora = TrainConfig(method="lora", seq_len=1024, micro_batch=4)
    eager = _est(cfg=replace(lora, attention="eager"))
    assert eager.train_hours > _est(cfg=lora).train_hours * 1.15
    full = TrainConfig(method="full", seq_len=2048, micro_batch=2)
    plain = _est(cfg=full, gpus=8, sharding="fsdp")
    off = _est(cfg=replace(full, offload=True), gpus=8, sharding="fsdp")
    assert off.train_hours > 1.5 * plain.train_hours  # PCIe traffic and a CPU optimizer step


def test_qlora_dequant_is_a_fixed_cost_per_step():
    q = TrainConfig(method="qlora", quant_bits=4, seq_len=2048, micro_batch=1)
    small = _est(cfg=q)
    big = _est(cfg=replace(q, micro_batch=8))
    assert small.dequant_s_per_step > 0
    assert small.dequant_s_per_step == pytest.approx(big.dequant_s_per_step)
    assert _est(cfg=replace(q, method="lora", quant_bits=16)).dequant_s_per_step == 0
    # its share of the time shrinks as steps grow
    assert big.tokens_per_sec > small.tokens_per_sec


def test_multi_gpu_nvlink_beats_pcie_and_scales_sublinearly():
    lora = TrainConfig(method="lora", seq_len=2048, micro_batch=4)
    single = _est(cfg=lora, gpu="A100-80GB", gpus=1)
    nv8 = _est(cfg=lora, gpu="A100-80GB", gpus=8, sharding="fsdp")
    assert nv8.comm_s_per_step > 0
    assert single.train_hours / 8 < nv8.train_hours < single.train_hours / 6
    cfg = TrainConfig(method="full", seq_len=2048, micro_batch=1, grad_accum=8)
    nvl = _est(cfg=cfg, gpu="A100-80GB", gpus=8, sharding="fsdp")
    pcie = _est(cfg=cfg, gpu="A6000", gpus=8, sharding="fsdp")  # 2-way bridge only: PCIe (P2P) for FSDP
    assert pcie.comm_s_per_step > 5 * nvl.comm_s_per_step  # ~24 GB/s against ~210 GB/s
    assert pcie.link["kind"] == "pcie" and nvl.link["kind"] == "nvlink"
    multi = _est(cfg=cfg, gpu="A100-80GB", gpus=16, nodes=2, sharding="fsdp", provider="aws",
                 offer_id="p4de.24xlarge")
    assert multi.comm_s_per_step > nvl.comm_s_per_step  # 400 Gb/s per node is slower than NVSwitch


# ---------------------------------------------------------------- interconnect (#15)

from cloudtune.planner import interconnect as ic  # noqa: E402


def test_every_gpu_row_names_its_interconnect_with_a_source():
    rows = list(csv.DictReader((Path(tp.__file__).parents[1] / "data" / "gpus.csv").open()))
    specs = gpu_specs()
    for r in rows:
        assert r["interconnect"], r["gpu"]
        assert len(r["interconnect_source"]) > 30, r["gpu"]
        link = ic.parse(r["interconnect"], specs[r["gpu"]])
        assert link.gbs > 0 and 0 <= link.overlap <= 1, r["gpu"]
    # SXM boards are NVSwitch, GeForce cards have no P2P, PCIe datacenter/workstation cards do
    kinds = {r["gpu"]: ic.parse(r["interconnect"], specs[r["gpu"]]).kind for r in rows}
    assert {kinds[g] for g in ("A100-40GB", "A100-80GB", "H100-SXM", "H200", "B200")} == {"nvlink"}
    assert {kinds[g] for g in ("RTX3090", "RTX4090", "RTX5090", "RTX5070", "RTX4060")} == {"pcie-no-p2p"}
    assert {kinds[g] for g in ("L4", "L40S", "A10G", "A6000", "A5000", "H100-80GB")} == {"pcie"}


def test_fabric_from_form_factor_provider_offer_and_network():
    s = gpu_specs()
    a100 = ic.resolve(s["A100-40GB"], provider="aws", offer_id="p4d.24xlarge")
    assert a100.kind == "nvlink" and a100.gbs == pytest.approx(600 * ic.NVLINK_EFFICIENCY)
    # Vast names its PCIe A100s; marketplace slots are assumed x8
    vast_pcie = ic.resolve(s["A100-40GB"], provider="vast", offer_id="2x-A100_PCIE-32-65536")
    assert vast_pcie.kind == "pcie" and vast_pcie.gbs == pytest.approx(ic.PCIE_X16_GBS[4] / 2)
    g5 = ic.resolve(s["A10G"], provider="aws", offer_id="g5.48xlarge")
    assert g5.kind == "pcie" and g5.gbs == pytest.approx(ic.PCIE_X16_GBS[4])
    vast_4090 = ic.resolve(s["RTX4090"], provider="vast", offer_id="4x-RTX_4090-32-65536")
    assert vast_4090.kind == "pcie-no-p2p"
    assert vast_4090.gbs == pytest.approx(ic.PCIE_X16_GBS[4] / 2 * ic.NO_P2P_FACTOR)
    assert ic.resolve(s["RTX4060"], provider="vast").gbs == vast_4090.gbs  # x8 either way, not x4
    # between nodes: AWS per instance family, Ethernet elsewhere
    p4d = ic.resolve(s["A100-40GB"], provider="aws", offer_id="p4d.24xlarge", nodes=2)
    p5 = ic.resolve(s["H100-SXM"], provider="aws", offer_id="p5.48xlarge", nodes=2)
    lam = ic.resolve(s["H100-SXM"], provider="lambda", offer_id="gpu_8x_h100_sxm5", nodes=2)
    assert p4d.node_gbs == pytest.approx(400 / 8 * ic.NIC_EFFICIENCY)
    assert p5.node_gbs == pytest.approx(8 * p4d.node_gbs)
    assert lam.node_gbs == pytest.approx(ic.DEFAULT_NODE_GBPS / 8 * ic.NIC_EFFICIENCY)
    assert lam.node_gbs < p4d.node_gbs
    # an override (a calibration row's published setup) wins, node rate included
    row = ic.resolve(s["A100-80GB"], nodes=2, override="nvswitch; 400 Gb/s")
    assert row.node_gbs == p4d.node_gbs


def test_fsdp_qlora_gathers_the_4bit_storage_and_ddp_only_trainable_gradients():
    q = TrainConfig(method="qlora", quant_bits=4, seq_len=2048, micro_batch=1)
    lora = replace(q, method="lora", quant_bits=16)
    fq = _est(cfg=q, gpu="RTX4090", gpus=2, sharding="fsdp", provider="vast")
    fl = _est(cfg=lora, gpu="RTX4090", gpus=2, sharding="fsdp", provider="vast")
    # 4-bit linears + fp32 absmax per 64 + bf16 embeddings/lm_head: ~0.37 of the bf16 bytes on Llama-3-8B
    assert 0.3 < fq.comm_s_per_step / fl.comm_s_per_step < 0.45
    ddp = _est(cfg=q, gpu="RTX4090", gpus=2, sharding="ddp", provider="vast", trainable_params=42_000_000)
    assert ddp.comm_s_per_step < fq.comm_s_per_step / 20
    # what hides under compute: half over PCIe, most over NVSwitch
    assert 0 < fl.comm_exposed_s_per_step < fl.comm_s_per_step
    assert ic.exposed_s(4.0, 1.0, ic.resolve(gpu_specs()["RTX4090"])) == pytest.approx(4.0 - ic.OVERLAP["pcie-no-p2p"])
    assert ic.exposed_s(1.0, 4.0, ic.resolve(gpu_specs()["RTX4090"])) == pytest.approx(1.0 - ic.OVERLAP["pcie-no-p2p"])
    nv = _est(cfg=lora, gpu="A100-80GB", gpus=2, sharding="fsdp")
    assert nv.comm_exposed_s_per_step <= (1 - ic.OVERLAP["nvlink"]) * nv.comm_s_per_step + 1e-9
    # a slow-lane consumer box (Answer.AI's 2x3090 rig) is slower than the same cards at x16
    slow = _est(cfg=lora, gpu="RTX3090", gpus=2, sharding="fsdp", interconnect="pcie3 x8 no-p2p")
    fast = _est(cfg=lora, gpu="RTX3090", gpus=2, sharding="fsdp", interconnect="pcie4 x16 no-p2p")
    assert slow.train_hours > 1.3 * fast.train_hours


def test_plan_json_names_the_fabric():
    est = _est(cfg=TrainConfig(method="qlora", quant_bits=4), gpu="RTX5070", gpus=4, sharding="fsdp",
               provider="vast", offer_id="4x-RTX_5070-32-65536")
    d = est.to_dict()
    assert d["interconnect"]["kind"] == "pcie-no-p2p" and "x8" in d["interconnect"]["describe"]
    assert d["comm_exposed_s_per_step"] > 0
    assert "overlap" in tp.assumptions()["interconnect"]


def test_spot_adds_expected_preemption_overhead():
    on_demand = _est(provider="aws", spot=False)
    spot = _est(provider="aws", spot=True)
    assert on_demand.preemption_hours == 0
    assert spot.preemption_hours > 0 and spot.expected_restarts > 0
    assert spot.total_hours > on_demand.total_hours
    shorter = _est(provider="aws", spot=True, checkpoint_minutes=2)
    assert shorter.preemption_hours < spot.preemption_hours  # less work lost per interruption
    assert _est(provider="modal").idle_tail_hours == 0 < _est(provider="aws").idle_tail_hours


def test_billing_granularity_and_minimum():
    assert tp.billed_hours(61 / 3600, "lambda", 60) == pytest.approx(120 / 3600)
    assert tp.billed_hours(10 / 3600, "aws", 1) == pytest.approx(60 / 3600)
    assert tp.billed_hours(10 / 3600, "modal", 1) == pytest.approx(10 / 3600)


def _rows():
    with DATA.open(newline="") as f:
        return list(csv.DictReader(f))


# The stated accuracy of the time model (docs/planner.md): every single-node row within a factor of 2,
# the median of each group within 0.8-1.25 where it has >= 3 rows (single GPU, multi-GPU NVLink,
# multi-GPU PCIe), held-out rows included. The one multi-node row (HF-01) is a lower bound: its wall
# time includes evaluation, checkpoint saves and loading, so the model must not come out slower.
SINGLE_NODE_FACTOR = 2.0
GROUP_MEDIAN = (0.8, 1.25)


def test_calibration_against_measured_throughput():
    from cloudtune.planner.calibration import evaluate_throughput

    rows = _rows()
    assert len(rows) >= 45
    res = evaluate_throughput(DATA.parent)
    by_group: dict[str, list[float]] = {}
    for t in res:
        by_group.setdefault(t.group, []).append(t.ratio)
        if t.nodes == 1:
            assert 1 / SINGLE_NODE_FACTOR <= t.ratio <= SINGLE_NODE_FACTOR, f"{t.id}: predicted/measured = {t.ratio:.2f}"
    assert {g: len(v) >= 3 for g, v in by_group.items()} == {
        "single-gpu": True, "multi-gpu-nvlink": True, "multi-gpu-pcie": True, "multi-node": False}
    for group in ("single-gpu", "multi-gpu-nvlink", "multi-gpu-pcie"):
        med = statistics.median(by_group[group])
        assert GROUP_MEDIAN[0] <= med <= GROUP_MEDIAN[1], (group, med)
    held = [t.ratio for t in res if t.split == "holdout" and t.nodes == 1 and t.gpus > 1]
    assert len(held) >= 5 and GROUP_MEDIAN[0] <= statistics.median(held) <= GROUP_MEDIAN[1]
    assert all(t.ratio >= 1 for t in res if t.nodes > 1)  # HF-01: a lower bound on the throughput


def test_pcie_rows_where_communication_dominates():
    """#15: 2x RTX 3090 FSDP over slow PCIe lanes at 512-2048 tokens per step came out 1.4-1.8x too fast
    with communication fully hidden behind compute; bf16 LoRA there runs slower than QLoRA."""
    from cloudtune.planner.calibration import evaluate_throughput

    ratio = {t.id: t.ratio for t in evaluate_throughput(DATA.parent)}
    for rid in ("AAI-01", "AAI-03", "AAI-04", "AAI-07"):
        assert 0.8 <= ratio[rid] <= 1.25, (rid, ratio[rid])
    measured = {r["id"]: float(r["tokens_per_sec_total"]) for r in _rows()}
    predicted = {k: ratio[k] * measured[k] for k in ("AAI-02", "AAI-04")}
    assert predicted["AAI-02"] > 1.5 * predicted["AAI-04"]  # QLoRA (4-bit gathers) beats LoRA on that rig


def test_assumptions_are_json():
    a = tp.assumptions()
    assert json.loads(json.dumps(a))["hfu_by_gpu_class"]["hopper"] == tp.HFU_BY_CLASS["hopper"]


# ---------------------------------------------------------------- dataset stats


def test_dataset_stats_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    recs = [{"instruction": "a" * 40, "output": "b" * 40, "n": 3}, {"messages": [{"role": "user", "content": "c" * 80}]}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    stats = dataset_stats(path)
    assert stats.records == 2
    # strings only: 80 chars of values + the role "user" in the second record
    expect = ((80 / CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_RECORD) + (84 / CHARS_PER_TOKEN + TEMPLATE_TOKENS_PER_RECORD)) / 2
    assert stats.avg_tokens == pytest.approx(expect)


def test_dataset_stats_json_and_parquet(tmp_path):
    recs = [{"text": "x" * 400}] * 5
    (tmp_path / "d.json").write_text(json.dumps({"train": recs}))
    assert dataset_stats(tmp_path / "d.json").records == 5
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(recs * 3), tmp_path / "d.parquet")
    stats = dataset_stats(tmp_path / "d.parquet")
    assert stats.records == 15 and stats.avg_tokens == pytest.approx(100 + TEMPLATE_TOKENS_PER_RECORD)


def test_dataset_stats_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 2: not valid JSON"):
        dataset_stats(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        dataset_stats(empty)
    with pytest.raises(DataError, match="unsupported extension"):
        dataset_stats(tmp_path.joinpath("x.csv").resolve() if (tmp_path / "x.csv").write_text("a") else None)
    with pytest.raises(DataError, match="not found"):
        dataset_stats(tmp_path / "missing.jsonl")
