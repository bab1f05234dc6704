"""What every Triton model of this package does when an instance starts: read its config parameters, and
find the device Triton placed it on (with torch's thread count set). Copied beside each model.py."""

from __future__ import annotations

from typing import Any

import torch


def param(config: dict[str, Any], key: str, default: str = "") -> str:
    """A ``parameters`` entry of the model's config (an unrendered ``${...}`` placeholder counts as unset)."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return default if value.startswith("${") else value


def int_param(config: dict[str, Any], key: str, default: int) -> int:
    return int(param(config, key, "") or default)


def instance_device(args: dict[str, Any], torch_threads: int) -> torch.device:
    """The device of this instance (``KIND_GPU``: ``cuda:<model_instance_device_id>``, made current; else the
    CPU); ``torch_threads`` > 0 sets torch's intra-op threads (one on 2-core machines: see the catalog)."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    if args.get("model_instance_kind") == "GPU":
        device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
