"""The dose-prediction network: a MONAI 3D U-Net with dropout, and MC-dropout switching.

torch and MONAI are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any

from twinrt.dosepredict.config import DosePredictConfig


def build_network(config: DosePredictConfig) -> Any:
    """A ``monai.networks.nets.UNet`` (3D) for ``config``: one input channel per
    ``config.inputs.channels``, one output channel (dose / ``dose_scale_gy``), dropout
    ``config.network.dropout`` in every block (used for MC dropout).

    :return: a ``torch.nn.Module`` on the CPU, float32, in training mode.
    """
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    net_cfg = config.network
    norm = Norm.INSTANCE if net_cfg.norm == "instance" else Norm.BATCH
    return UNet(spatial_dims=3, in_channels=len(config.inputs.channels), out_channels=1,
                channels=tuple(int(c) for c in net_cfg.channels), strides=tuple(int(s) for s in net_cfg.strides),
                num_res_units=int(net_cfg.num_res_units), dropout=float(net_cfg.dropout), norm=norm)


def enable_mc_dropout(net: Any) -> int:
    """Put ``net`` in evaluation mode except its dropout layers (Monte-Carlo dropout).

    Normalisation layers stay in evaluation mode, so only dropout makes the passes differ.

    :return: the number of dropout layers switched on (0: the network cannot give an MC std).
    """
    import torch

    net.eval()
    n = 0
    for m in net.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)):
            if m.p > 0:
                m.train()
                n += 1
    return n


def count_parameters(net: Any) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))
