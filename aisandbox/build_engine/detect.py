"""Stage 2: pick the GPU profile — detected through NVML / nvidia-smi (`--gpu auto`) or named (`--gpu h100-sxm`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aisandbox.artifacts import DeviceInfo, DeviceSource, GpuNotFound
from aisandbox.build_engine.errors import ProfileError
from aisandbox.build_engine.profiles import GpuProfile, load_profile, load_profiles

__all__ = ["GpuChoice", "match_profile", "rank_devices", "resolve_gpu"]


@dataclass(frozen=True, slots=True)
class GpuChoice:
    """The profile to build with, and the GPU it was checked against (None: no GPU looked at, a dry run)."""

    profile: GpuProfile
    device: DeviceInfo | None
    how: str
    """How the profile was chosen, for the progress output."""
    notes: tuple[str, ...] = ()
    all_devices: tuple[DeviceInfo, ...] = ()
    """Every GPU the probe listed (for picking the other tensor-parallel ranks)."""

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


def _probe(source: DeviceSource) -> list[DeviceInfo]:
    try:
        return list(source())
    except GpuNotFound as exc:
        raise ProfileError(f"{exc}. On a machine without a GPU, name a profile: --gpu h100-sxm --dry-run") from exc


def _pick(devices: list[DeviceInfo], index: int) -> DeviceInfo:
    by_index = {d.index: d for d in devices}
    if index not in by_index:
        raise ProfileError(f"there is no GPU {index}; found {len(devices)}: {', '.join(d.name for d in devices)}")
    return by_index[index]


def rank_devices(choice: GpuChoice, device_indices: tuple[int, ...], tp_size: int) -> tuple[DeviceInfo, ...]:
    """The GPUs of the ranks 0..tp_size-1, in rank order.

    Args:
        choice: The resolved GPU choice (its device is rank 0's).
        device_indices: `--device`: one NVML index (the first rank; the others take the next indices) or
            exactly tp_size indices.
        tp_size: Ranks of the engine.

    Raises:
        ProfileError: Too few GPUs, a wrong count of --device indices, or ranks of different architectures.
    """
    if choice.device is None:
        return ()
    if len(device_indices) == 1:
        wanted = tuple(range(device_indices[0], device_indices[0] + tp_size))
    elif len(device_indices) == tp_size:
        wanted = device_indices
    else:
        raise ProfileError(f"--device names {len(device_indices)} GPUs but the engine has --tp {tp_size} ranks")
    if len(set(wanted)) != len(wanted):
        raise ProfileError(f"--device names a GPU twice: {','.join(map(str, wanted))}")
    devices = list(choice.all_devices) or [choice.device]
    if tp_size > len(devices):
        raise ProfileError(f"--tp {tp_size} needs {tp_size} GPUs; this machine has {len(devices)}")
    ranks = tuple(_pick(devices, i) for i in wanted)
    for device in ranks[1:]:
        if device.compute_capability != ranks[0].compute_capability or device.name != ranks[0].name:
            raise ProfileError(
                f"tensor-parallel ranks must be the same GPU type: GPU {ranks[0].index} is a {ranks[0].name}, "
                f"GPU {device.index} a {device.name}; pick matching GPUs with --device"
            )
    return ranks


def match_profile(device: DeviceInfo, profiles: list[GpuProfile], tp_size: int | None = None) -> GpuProfile:
    """The profile whose name patterns match the device (closest memory size first).

    Only single-GPU profiles are candidates unless `tp_size` asks for a tensor-parallel one; without one for that
    tp size, the single-GPU profile is used (and its tp_size overridden by the caller).
    """
    candidates = [p for p in profiles if p.matches(device.name)]
    wanted = tp_size or 1
    matches = [p for p in candidates if p.tp_size == wanted] or [p for p in candidates if p.tp_size == 1]
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
    gpu: str,
    *,
    profiles_dir: Path,
    devices: DeviceSource,
    device_index: int = 0,
    dry_run: bool = False,
    tp_size: int | None = None,
) -> GpuChoice:
    """Resolve `--gpu auto|<profile>`.

    Args:
        gpu: 'auto' or a profile name.
        profiles_dir: Where the profile YAML files are.
        devices: Lists the GPUs (NVML / nvidia-smi in production, a fake in tests).
        device_index: Which GPU to build on.
        dry_run: With a named profile, skip the GPU entirely (plan for the profile's nominal GPU).
        tp_size: `--tp`, if given: with `auto`, prefer a matching profile made for that many GPUs.

    Raises:
        ProfileError: No GPU for `auto`, no matching profile, or the profile's architecture is not this GPU's.
    """
    if gpu == "auto":
        found = _probe(devices)
        device = _pick(found, device_index)
        profile = match_profile(device, load_profiles(profiles_dir), tp_size)
        return GpuChoice(profile, device, f"detected GPU {device.index}: {device.name}", (), tuple(found))
    profile = load_profile(gpu, profiles_dir)
    if dry_run:
        return GpuChoice(profile, None, "named by --gpu (dry run: no GPU consulted)")
    found = _probe(devices)
    device = _pick(found, device_index)
    _check_arch(profile, device)
    notes = (
        ()
        if profile.matches(device.name)
        else (
            f"profile {profile.name} is named for {profile.display_name}, "
            f"building on a {device.name} of the same architecture",
        )
    )
    return GpuChoice(
        profile, device, f"named by --gpu, checked against GPU {device.index}: {device.name}", notes, tuple(found)
    )
