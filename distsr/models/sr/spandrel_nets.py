"""spandrel's SwinIR and RCAN with the two changes our conformance fixtures ask for.

* SwinIR: the network's own bottom/right reflect pad to a multiple of the window (official
  ``network_swinir.py``) by default; ``pad_mode = "testscript"`` applies the official
  ``main_test_swinir.py`` pad instead (always 1..ws pixels, mirrored with the edge repeated) and
  crops the output (conformance/sr README §1).
* RCAN: spandrel's forward scales its input in place (``x *= rgb_range``), which would change
  the caller's lq; ours computes the same thing out of place.

Parameter names, shapes and every other operation are spandrel's (= the official code's).
This module imports spandrel, which is slow to import; it is loaded on first use.
"""

from __future__ import annotations

import torch
from spandrel.architectures.RCAN import RCAN as _SpandrelRCAN
from spandrel.architectures.SwinIR import SwinIR as _SpandrelSwinIR
from torch import nn

PAD_MODES = ("reflect", "testscript")


def testscript_pad(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``main_test_swinir.py``'s pad: to (h // ws + 1) * ws (always 1..ws rows and columns),
    by concatenating the flipped image and cropping (a mirror that repeats the edge pixel)."""
    h, w = x.shape[-2:]
    h_new, w_new = (h // window_size + 1) * window_size, (w // window_size + 1) * window_size
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :h_new, :]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :w_new]


class SwinIR(_SpandrelSwinIR):
    """Official SwinIR (``network_swinir.py`` names and forward) with a choice of padding."""

    pad_mode = "reflect"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "reflect":
            return super().forward(x)
        h, w = x.shape[-2:]
        sr = super().forward(testscript_pad(x, self.window_size))
        return sr[:, :, : h * self.upscale, : w * self.upscale]


class RCAN(_SpandrelRCAN):
    """Original RCAN (yulunzhang/RCAN names) whose forward leaves its input untouched."""

    def freeze_meanshift(self) -> RCAN:
        """The MeanShift convs are constants in the original code; keep them out of training."""
        for module in (self.sub_mean, self.add_mean):
            module.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.head(self.sub_mean(self.check_img_size(x) * self.rgb_range))
        x = self.tail(self.body(x) + x)
        x = self.add_mean(x) / self.rgb_range
        return x[:, :, : h * self.scale, : w * self.scale]


OWN_SUBCLASSES: dict[type, type] = {_SpandrelSwinIR: SwinIR, _SpandrelRCAN: RCAN}


def adopt(net: nn.Module) -> nn.Module:
    """Give a spandrel SwinIR / RCAN our forward. The subclasses add no state (only methods),
    so switching the class of the loaded module keeps its weights and buffers untouched."""
    own = OWN_SUBCLASSES.get(type(net))
    if own is not None:
        net.__class__ = own
    return net
