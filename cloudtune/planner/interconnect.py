"""How fast the GPUs of one option talk to each other: the communication half of multi-GPU time.

Why a module: FSDP over PCIe on a marketplace host and FSDP over NVSwitch differ by 10-100x in
bandwidth, and whether that matters depends on how much of it hides under compute. Answer.AI's
FSDP-QLoRA benchmarks show both ends on the same code: a 2x RTX 3090 "basement rig" (older
motherboard, slow PCIe lanes, no NVLink) where 7B LoRA ran *slower* than QLoRA because the bf16
weights crossed PCIe every step, and a 2x RTX 4090 workstation (PCIe 4.0 x16 to both cards) where
FSDP cost ~10% over DDP (AnswerDotAI/fsdp_qlora benchmarks_03_2024.md). A flat "PCIe = 4 GB/s, fully
overlapped" could not be right for both; this module makes the fabric an input.

The fabric of an option comes from, in order: an explicit override (a calibration row's published
setup, `interconnect=`), the offer id (Vast names its PCIe A100s `A100_PCIE`), the provider (Vast
consumer cards sit on marketplace hosts, often at x8 lanes), the GPU's form factor (gpus.csv
`interconnect` column, with its source). Between nodes: the instance's network (AWS p4d/p4de 400
Gb/s EFA, p5 3200 Gb/s EFA; others Ethernet).

The numbers (effective NCCL bus bandwidth per GPU, GB/s):

    NVLink / NVSwitch   datasheet NVLink figure (bidirectional, gpus.csv `nvlink`) x NVLINK_EFFICIENCY
    PCIe, P2P           PCIE_X16_GBS[gen] x lanes/16 (datacenter and workstation cards)
    PCIe, no P2P        the same x NO_P2P_FACTOR: GeForce cards have peer-to-peer disabled, so
                        NCCL stages every transfer through host memory (both links, twice the copies)
    between nodes       the node's NIC bandwidth x NIC_EFFICIENCY, shared by its GPUs; a ring
                        crosses it with (nodes-1)/nodes of the data

and the share of communication that FSDP's prefetch (or DDP's bucketed all-reduce) hides under
compute, OVERLAP[kind]. Stdlib only: imported by `cloudtune plan`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache

from cloudtune.catalog import GpuSpec

# Effective per-direction bandwidth of a x16 link for large NCCL transfers, GB/s. PCI-SIG signalling
# rates are 15.75 / 31.5 / 63 GB/s per direction for gen3/4/5 x16 (PCI Express Base Specification
# 3.0/4.0/5.0); NCCL's all-gather reaches ~75% of it over a switch or root complex.
PCIE_X16_GBS: dict[int, float] = {3: 12.0, 4: 24.0, 5: 48.0}
# GeForce (no P2P): NCCL's SHM transport copies GPU -> pinned host buffer -> GPU, and on consumer
# boards both cards share the CPU's lanes. Fitted with OVERLAP on AAI-01..10/14/15/17/18 (tune rows).
NO_P2P_FACTOR = 0.5
# NCCL all-gather/reduce-scatter bus bandwidth on NVSwitch boards against the datasheet's bidirectional
# NVLink figure: DGX A100 ~210-230 GB/s of 600, HGX H100 ~315-360 of 900 (nccl-tests figures NVIDIA
# and AWS publish for their 8-GPU boards).
NVLINK_EFFICIENCY = 0.35
# Share of the node's NIC line rate a ring collective reaches (EFA/InfiniBand with the NCCL plugin).
NIC_EFFICIENCY = 0.8
# Share of communication hidden under compute, by fabric. NVLink: FSDP's BACKWARD_PRE prefetch hides
# nearly all of it (Answer.AI: on H100 "the extra time spent transferring data didn't matter since it
# was happening while the computation was being done"); the tune rows barely move between 0.7 and 1.0.
# PCIe without P2P: half, fitted with NO_P2P_FACTOR on the 2x3090/2x4090 tune rows (grid over
# 0.35-0.8 x 0-0.7: median |log ratio| 0.058 at 0.5/0.5, 0.098 at 0.5/0.3). PCIe with P2P: no tune row;
# assumed the same half, checked on the held-out A5000 rows (AAI-30/31).
OVERLAP: dict[str, float] = {"nvlink": 0.9, "pcie": 0.5, "pcie-no-p2p": 0.5}

# Inter-node network per node, Gb/s, by instance family (AWS instance pages: P4d/P4de "400 Gbps
# networking with EFA", P5 "3,200 Gbps of EFAv2", P5en "3,200 Gbps of EFAv3", P6-B200/B300 "3,200 Gbps
# EFAv4"; P3dn 100 Gbps; P3/G5/G6e without EFA at their ENA rates).
AWS_NODE_GBPS: dict[str, float] = {
    "p4d": 400, "p4de": 400, "p5": 3200, "p5e": 3200, "p5en": 3200, "p6-b200": 3200, "p6-b300": 6400,
    "p3dn": 100, "p3": 25, "g5": 100, "g6e": 400,
}
# Others: SkyPilot clusters ordinary instances over the provider's Ethernet (Lambda documents
# InfiniBand only for its 1-Click Clusters, which SkyPilot does not launch; RunPod and Vast only in
# their Instant Clusters). 25 Gb/s is a typical cloud VM NIC; an assumption, not a published figure.
DEFAULT_NODE_GBPS = 25.0
# Marketplace hosts (Vast) put consumer cards on whatever slots the board has: 4-8 GPU boxes are
# usually x8 (or x4 behind risers). Assumed x8; Vast's own offer fields (pcie_bw, gpu_lanes) would say
# per host, but the bundled catalog's buckets do not carry them.
MARKETPLACE_LANES = 8
MARKETPLACE_PROVIDERS = frozenset({"vast"})


@dataclass(frozen=True)
class Link:
    """The fabric one option's collectives run over."""

    kind: str  # nvlink | pcie | pcie-no-p2p
    gbs: float  # effective bus bandwidth per GPU inside a node, GB/s
    overlap: float  # share of communication hidden under compute
    node_gbs: float = 0.0  # between nodes, per node (0: one node)
    describe: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "gbs": round(self.gbs, 1), "overlap": self.overlap,
                "node_gbs": round(self.node_gbs, 1), "describe": self.describe}


@lru_cache(maxsize=1)
def form_factor_interconnect() -> dict[str, str]:
    """gpus.csv's `interconnect` column (the fabric between GPUs of that form factor), by GPU name."""
    from cloudtune.catalog import _data_path

    with _data_path("gpus.csv").open(newline="") as f:
        return {r["gpu"]: (r.get("interconnect") or "").strip() for r in csv.DictReader(f)}


def parse(text: str, gpu: GpuSpec) -> Link:
    """A fabric description: `nvswitch`, `nvlink`, `pcie4`, `pcie5 x8`, `pcie3 x8 no-p2p`, ..."""
    t = text.lower()
    if t.startswith(("nvswitch", "nvlink", "infinity")):
        bw = gpu.nvlink_gbs or _first_number(t) or 0.0
        if bw:
            return Link("nvlink", bw * NVLINK_EFFICIENCY, OVERLAP["nvlink"], describe=text)
    gen_match = re.search(r"pcie\s*(\d)", t)
    gen = int(gen_match.group(1)) if gen_match else 4
    lanes_match = re.search(r"x(\d+)", t)
    lanes = int(lanes_match.group(1)) if lanes_match else 16
    gbs = PCIE_X16_GBS.get(gen, 24.0) * lanes / 16
    if "no-p2p" in t:
        return Link("pcie-no-p2p", gbs * NO_P2P_FACTOR, OVERLAP["pcie-no-p2p"], describe=text)
    return Link("pcie", gbs, OVERLAP["pcie"], describe=text)


def _first_number(t: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)", t)
    return float(m.group(1)) if m else None


def node_gbps(provider: str, offer_id: str) -> float:
    """The inter-node network of one node, Gb/s."""
    if provider == "aws":
        family = offer_id.split(".")[0]
        if family in AWS_NODE_GBPS:
            return AWS_NODE_GBPS[family]
    return DEFAULT_NODE_GBPS


def resolve(gpu: GpuSpec, *, provider: str = "", offer_id: str = "", nodes: int = 1,
            override: str | None = None) -> Link:
    """The fabric of `gpu` x n in one offer (see the module doc for the order of sources)."""
    if override:
        text = override.split(";")[0].strip()
    else:
        text = form_factor_interconnect().get(gpu.name, "") or ("nvswitch" if gpu.nvlink_gbs else "pcie4")
        oid = offer_id.upper()
        if "PCIE" in oid and text.startswith(("nvswitch", "nvlink")):
            text = "pcie4"  # a PCIe variant of an SXM part (Vast's A100_PCIE)
        if provider in MARKETPLACE_PROVIDERS and text.startswith("pcie") and not re.search(r"\bx\d+", text):
            gen, _, rest = text.partition(" ")
            text = f"{gen} x{MARKETPLACE_LANES} {rest}".strip()  # marketplace host: x8 slots assumed
    link = parse(text, gpu)
    if nodes > 1:
        gbps = _override_node_gbps(override) or node_gbps(provider, offer_id)
        link = Link(link.kind, link.gbs, link.overlap, gbps / 8 * NIC_EFFICIENCY,
                    f"{link.describe}; {gbps:g} Gb/s between nodes")
    return link


def _override_node_gbps(override: str | None) -> float | None:
    if not override or ";" not in override:
        return None
    m = re.search(r"(\d+(?:\.\d+)?)\s*gb/s", override.split(";", 1)[1].lower())
    return float(m.group(1)) if m else None


def collective_s(bytes_total: float, gpus: int, nodes: int, link: Link) -> float:
    """Seconds for ring collectives (all-gather / reduce-scatter) moving `bytes_total` (the full
    tensor size, summed over the collectives of one step) across `gpus` GPUs on `nodes` nodes."""
    if gpus <= 1 or bytes_total <= 0:
        return 0.0
    inside = bytes_total * (gpus - 1) / gpus / (link.gbs * 1e9)
    if nodes <= 1 or not link.node_gbs:
        return inside
    between = bytes_total * (nodes - 1) / nodes / (link.node_gbs * 1e9)
    return max(inside, between)


def exposed_s(comm_s: float, compute_s: float, link: Link) -> float:
    """The part of communication that does not hide under compute."""
    return comm_s - link.overlap * min(comm_s, compute_s)
