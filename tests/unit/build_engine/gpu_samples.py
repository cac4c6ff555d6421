"""DeviceInfo of real boards, as NVML reports them (MiB totals as nvidia-smi prints them)."""

from aisandbox.artifacts import DeviceInfo

H100_SXM = DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 81559 * 2**20, "580.65.06", "13.0")
L4 = DeviceInfo(0, "NVIDIA L4", "8.9", 23034 * 2**20, "580.65.06", "13.0")
L40S = DeviceInfo(0, "NVIDIA L40S", "8.9", 46068 * 2**20, "580.65.06", "13.0")
A100_40 = DeviceInfo(0, "NVIDIA A100-SXM4-40GB", "8.0", 40960 * 2**20, "580.65.06", "13.0")
A100_80 = DeviceInfo(0, "NVIDIA A100-SXM4-80GB", "8.0", 81920 * 2**20, "580.65.06", "13.0")
