"""Stage 2: pick the GPU profile — detected through NVML / nvidia-smi (`--gpu auto`) or named (`--gpu h100-sxm`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aisandbox.artifacts import DeviceInfo, DeviceSource, GpuNotFound
from aisandbox.build_engine.errors import ProfileError
from aisandbox.build_engine.profiles import GpuProfile, load_profile, load_profiles

__all__ = ["GpuChoice", "match_profile", "resolve_gpu"]


@dataclass(frozen=True, slots=True)
class GpuChoice:
    """The profile to build with, and the GPU it was checked against (None: no GPU looked at, a dry run)."""

    profile: GpuProfile
    device: DeviceInfo | None
    how: str
    """How the profile was chosen, for the progress output."""
    notes: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        """Memory to plan with: the detected GPU's, else the profile's nominal size."""
        if self.device is not None:
            return self.device.memory_bytes
        return int(self.profile.memory_gib * 2**30)

    @property
    def gpu_name(self) -> str:
        """Name of the GPU planned for."""
        return self.device.name if self.device is not None else self.profile.display_name


def _device(source: DeviceSource, index: int) -> DeviceInfo:
    try:
        devices = list(source())
    except GpuNotFound as exc:
        raise ProfileError(f"{exc}. On a machine without a GPU, name a profile: --gpu h100-sxm --dry-run") from exc
    if not 0 <= index < len(devices):
        raise ProfileError(f"there is no GPU {index}; found {len(devices)}: {', '.join(d.name for d in devices)}")
    return devices[index]


def match_profile(device: DeviceInfo, profiles: list[GpuProfile]) -> GpuProfile:
    """The profile whose name patterns match the device (closest memory size first)."""
    matches = [p for p in profiles if p.matches(device.name)]
    if not matches:
        same_arch = [p.name for p in profiles if p.compute_capability == device.compute_capability]
        hint = (
            f"; profiles for compute capability {device.compute_capability}: {', '.join(same_arch)}"
            if same_arch
            else ""
        )
        raise ProfileError(
            f"no GPU profile matches '{device.name}' (compute capability {device.compute_capability}, "
            f"{device.memory_gib:.1f} GiB){hint}. Pass --gpu <profile>, or add configs/gpu/<name>.yaml."
        )
    best = min(matches, key=lambda p: abs(p.memory_gib * 2**30 - device.memory_bytes))
    _check_arch(best, device)
    return best


def _check_arch(profile: GpuProfile, device: DeviceInfo) -> None:
    if profile.compute_capability != device.compute_capability:
        raise ProfileError(
            f"profile {profile.name} is for compute capability {profile.compute_capability}, but GPU {device.index} "
            f"({device.name}) has {device.compute_capability}; TensorRT compiles for the GPU it runs on, so build "
            "on the target GPU type (or --dry-run to only see the plan)"
        )


def resolve_gpu(
    gpu: str, *, profiles_dir: Path, devices: DeviceSource, device_index: int = 0, dry_run: bool = False
) -> GpuChoice:
    """Resolve `--gpu auto|<profile>`.

    Args:
        gpu: 'auto' or a profile name.
        profiles_dir: Where the profile YAML files are.
        devices: Lists the GPUs (NVML / nvidia-smi in production, a fake in tests).
        device_index: Which GPU to build on.
        dry_run: With a named profile, skip the GPU entirely (plan for the profile's nominal GPU).

    Raises:
        ProfileError: No GPU for `auto`, no matching profile, or the profile's architecture is not this GPU's.
    """
    if gpu == "auto":
        device = _device(devices, device_index)
        profile = match_profile(device, load_profiles(profiles_dir))
        return GpuChoice(profile, device, f"detected GPU {device.index}: {device.name}")
    profile = load_profile(gpu, profiles_dir)
    if dry_run:
        return GpuChoice(profile, None, "named by --gpu (dry run: no GPU consulted)")
    device = _device(devices, device_index)
    _check_arch(profile, device)
    notes = (
        ()
        if profile.matches(device.name)
        else (
            f"profile {profile.name} is named for {profile.display_name}, "
            f"building on a {device.name} of the same architecture",
        )
    )
    return GpuChoice(profile, device, f"named by --gpu, checked against GPU {device.index}: {device.name}", notes)
