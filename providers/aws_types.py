"""AWS GPU instance types, their GPUs, and the regions cloudtune uses by default.

Why a static table: `describe_instance_types` needs credentials and one call per region, while
the planner must work offline. The figures mirror `describe_instance_types -> GpuInfo` (as in
moto's copy of it, ec2/resources/instance_types.json); GPU names are the catalog's normalised
names (cloudtune/data/gpus.csv), e.g. p4d's "A100" is `A100-40GB` and p5's "H100" is `H100-SXM`.
A test checks every row against gpus.csv.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: str  # normalised name, a row of gpus.csv
    gpu_count: int
    vcpus: int
    ram_gib: int

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]


def _rows(gpu: str, rows: list[tuple[str, int, int, int]]) -> dict[str, InstanceType]:
    return {name: InstanceType(name, gpu, count, vcpus, ram) for name, count, vcpus, ram in rows}


# (type, GPUs, vCPUs, RAM GiB). Bare-metal sizes are left out: they cost the same as the largest
# virtual size and take longer to boot.
INSTANCE_TYPES: dict[str, InstanceType] = {
    **_rows("T4", [("g4dn.xlarge", 1, 4, 16), ("g4dn.2xlarge", 1, 8, 32), ("g4dn.4xlarge", 1, 16, 64),
                   ("g4dn.8xlarge", 1, 32, 128), ("g4dn.16xlarge", 1, 64, 256), ("g4dn.12xlarge", 4, 48, 192)]),
    **_rows("A10G", [("g5.xlarge", 1, 4, 16), ("g5.2xlarge", 1, 8, 32), ("g5.4xlarge", 1, 16, 64),
                     ("g5.8xlarge", 1, 32, 128), ("g5.16xlarge", 1, 64, 256), ("g5.12xlarge", 4, 48, 192),
                     ("g5.24xlarge", 4, 96, 384), ("g5.48xlarge", 8, 192, 768)]),
    **_rows("L4", [("g6.xlarge", 1, 4, 16), ("g6.2xlarge", 1, 8, 32), ("g6.4xlarge", 1, 16, 64),
                   ("g6.8xlarge", 1, 32, 128), ("g6.16xlarge", 1, 64, 256), ("g6.12xlarge", 4, 48, 192),
                   ("g6.24xlarge", 4, 96, 384), ("g6.48xlarge", 8, 192, 768)]),
    **_rows("L40S", [("g6e.xlarge", 1, 4, 32), ("g6e.2xlarge", 1, 8, 64), ("g6e.4xlarge", 1, 16, 128),
                     ("g6e.8xlarge", 1, 32, 256), ("g6e.16xlarge", 1, 64, 512), ("g6e.12xlarge", 4, 48, 384),
                     ("g6e.24xlarge", 4, 96, 768), ("g6e.48xlarge", 8, 192, 1536)]),
    **_rows("A100-40GB", [("p4d.24xlarge", 8, 96, 1152)]),
    **_rows("A100-80GB", [("p4de.24xlarge", 8, 96, 1152)]),
    **_rows("H100-SXM", [("p5.4xlarge", 1, 16, 256), ("p5.48xlarge", 8, 192, 2048)]),
    **_rows("H200", [("p5e.48xlarge", 8, 192, 2048), ("p5en.48xlarge", 8, 192, 2048)]),
    **_rows("B200", [("p6-b200.48xlarge", 8, 192, 2048)]),
}

# Regions swept by default (offers, launch, gc): every region the bundled catalog prices, so a plan
# never picks a region `gc` would not sweep. Opt-in regions answer AuthFailure/OptInRequired until
# enabled on the account: sweeps skip them, and a launch there fails over to the next offer.
STANDARD_REGIONS: tuple[str, ...] = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1",
    "eu-west-1", "eu-west-2", "eu-west-3", "eu-central-1", "eu-north-1",
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1",
    "ap-southeast-1", "ap-southeast-2", "sa-east-1",
)
OPT_IN_REGIONS: frozenset[str] = frozenset({
    "af-south-1", "ap-east-1", "ap-south-2", "ap-southeast-3", "ap-southeast-4", "ap-southeast-5",
    "ca-west-1", "eu-central-2", "eu-south-1", "eu-south-2", "il-central-1", "me-central-1", "me-south-1",
})
DEFAULT_REGIONS: tuple[str, ...] = STANDARD_REGIONS + (
    "af-south-1", "ap-east-1", "ap-southeast-3", "eu-south-1", "eu-south-2", "me-central-1", "me-south-1",
)

# The Deep Learning Base OSS Nvidia Driver GPU AMI (driver, CUDA, docker, nvidia-container-toolkit),
# published per region as a public SSM parameter.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
