"""GPU auto-detection, with the device list injected."""

from __future__ import annotations

import dataclasses

import pytest
from gpu_samples import A100_40, A100_80, H100_SXM, L4, L40S

from aisandbox.artifacts import DeviceInfo, GpuNotFound, parse_nvidia_smi
from aisandbox.build_engine.detect import match_profile, resolve_gpu
from aisandbox.build_engine.errors import ProfileError
from aisandbox.build_engine.profiles import DEFAULT_PROFILES_DIR, load_profiles

NVML_NAMES = {
    "NVIDIA H100 80GB HBM3": ("9.0", 81559, "h100-sxm"),
    "NVIDIA H100 PCIe": ("9.0", 81559, "h100-pcie"),
    "NVIDIA H200": ("9.0", 143771, "h200"),
    "NVIDIA A100-SXM4-80GB": ("8.0", 81920, "a100-80gb"),
    "NVIDIA A100-PCIE-40GB": ("8.0", 40960, "a100-40gb"),
    "NVIDIA L40S": ("8.9", 46068, "l40s"),
    "NVIDIA L4": ("8.9", 23034, "l4"),
    "NVIDIA A10G": ("8.6", 23028, "a10g"),
    "NVIDIA RTX 4000 Ada Generation": ("8.9", 20475, "rtx-4000-ada"),
    "NVIDIA RTX 6000 Ada Generation": ("8.9", 49140, "rtx-6000-ada"),
    "NVIDIA GeForce RTX 4090": ("8.9", 24564, "rtx-4090"),
}


@pytest.mark.parametrize("name", sorted(NVML_NAMES))
def test_each_real_gpu_name_picks_its_profile(name: str) -> None:
    cap, mib, expected = NVML_NAMES[name]
    device = DeviceInfo(0, name, cap, mib * 2**20)
    assert match_profile(device, load_profiles()).name == expected


def test_auto_uses_the_injected_devices_and_their_memory() -> None:
    choice = resolve_gpu("auto", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [L4])
    assert choice.profile.name == "l4"
    assert choice.device == L4
    assert choice.memory_bytes == L4.memory_bytes


def test_auto_picks_the_requested_device_index() -> None:
    second = dataclasses.replace(L40S, index=1)
    choice = resolve_gpu("auto", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [A100_80, second], device_index=1)
    assert choice.profile.name == "l40s"
    with pytest.raises(ProfileError, match="there is no GPU 2"):
        resolve_gpu("auto", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [A100_80, second], device_index=2)


def test_auto_without_a_gpu_says_how_to_dry_run() -> None:
    def no_gpu() -> list[DeviceInfo]:
        raise GpuNotFound("no NVIDIA GPU found (NVML: not installed)")

    with pytest.raises(ProfileError, match="--gpu h100-sxm --dry-run"):
        resolve_gpu("auto", profiles_dir=DEFAULT_PROFILES_DIR, devices=no_gpu)


def test_an_unknown_gpu_lists_the_profiles_of_its_architecture() -> None:
    device = DeviceInfo(0, "NVIDIA RTX 2000 Ada Generation", "8.9", 16380 * 2**20)
    with pytest.raises(ProfileError, match="no GPU profile matches.*8.9: .*l4"):
        resolve_gpu("auto", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [device])


def test_a_named_profile_for_another_architecture_is_refused_for_a_real_build() -> None:
    with pytest.raises(ProfileError, match="compiles for the GPU it runs on"):
        resolve_gpu("h100-sxm", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [A100_40])


def test_a_named_profile_on_a_sibling_gpu_is_allowed_with_a_note() -> None:
    choice = resolve_gpu("l40s", profiles_dir=DEFAULT_PROFILES_DIR, devices=lambda: [L4])
    assert choice.device == L4 and choice.notes


def test_a_dry_run_with_a_named_profile_consults_no_gpu() -> None:
    def fail() -> list[DeviceInfo]:
        raise AssertionError("no GPU must be probed")

    choice = resolve_gpu("h100-sxm", profiles_dir=DEFAULT_PROFILES_DIR, devices=fail, dry_run=True)
    assert choice.device is None
    assert choice.memory_bytes == int(79.6 * 2**30)


def test_nvidia_smi_output_is_parsed() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 580.65.06\n1, NVIDIA H100 80GB HBM3, 9.0, 81559, 580.65.06\n"
    devices = parse_nvidia_smi(out)
    assert [d.index for d in devices] == [0, 1]
    assert devices[0].name == H100_SXM.name
    assert devices[0].compute_capability == "9.0"
    assert devices[0].memory_bytes == 81559 * 2**20
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("0, NVIDIA L4, 8.9\n")


def test_auto_picks_single_gpu_profiles_unless_tp_is_asked() -> None:
    profiles = load_profiles(DEFAULT_PROFILES_DIR)
    assert match_profile(L4, profiles).name == "l4"
    assert match_profile(L4, profiles, tp_size=2).name == "l4-tp2"
    assert match_profile(L40S, profiles, tp_size=2).name == "l40s"  # no TP profile: the caller overrides tp_size


def test_nvidia_smi_reports_uuid_and_memory_in_use() -> None:
    (device,) = parse_nvidia_smi("1, NVIDIA L4, 8.9, 23034, 580.65.06, GPU-5b1e0c3a-aaaa, 20480\n")
    assert (device.index, device.uuid, device.memory_used_bytes) == (1, "GPU-5b1e0c3a-aaaa", 20480 * 2**20)
