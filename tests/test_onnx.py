"""ONNX export of students (``upscale export --format onnx``), checked against PyTorch.

Two tiny random students in fake run folders (config.yaml + export/, as training writes them):
the one-step ResShift student of configs/resshift_tiny.yaml and the SwinIR student of
configs/dtkd_tiny.yaml. Each is exported through the CLI, run by onnxruntime on two inputs of
other batches and sizes than the export's own check, and compared with the PyTorch predictor
(fp32: max abs difference <= 1e-4 on [0, 1] images); ``upscale`` with the .onnx file writes the
image the PyTorch weights write, within one 8-bit level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from distsr.config import planning_without_files
from distsr.inference.onnx_predictor import OnnxResShiftOneStep, onnx_predictor
from distsr.inference.predictors import ResShiftOneStep, load_predictor
from distsr.inference.sr_predictor import SRNet
from distsr.models.resshift_unet import UNetModelSwin
from distsr.models.sr import build_sr
from distsr.runconfig import load_run_config, to_dict
from distsr.upscale.cli import main as upscale_main
from distsr.upscale.onnx_export import BOUNDS, OnnxCheckError, export_predictor


def run_config(name: str):
    with planning_without_files():  # dtkd_tiny names a teacher file it does not need here
        return load_run_config(name)


def write_run(run: Path, config: str, net: torch.nn.Module, engine: str) -> Path:
    cfg = run_config(config)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "export").mkdir()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(run / "export" / f"{engine}.safetensors"))
    return run


@pytest.fixture(scope="module")
def resshift_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = UNetModelSwin(**run_config("resshift_tiny").method.unet)
    with torch.no_grad():  # the official zero-initialised convs get small random weights
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return write_run(tmp_path_factory.mktemp("resshift"), "resshift_tiny", unet, "unet")


@pytest.fixture(scope="module")
def swinir_run(tmp_path_factory) -> Path:
    student = run_config("dtkd_tiny").method.student
    torch.manual_seed(0)
    net = build_sr(student.arch, student.preset, scale=student.scale, **student.kwargs)
    return write_run(tmp_path_factory.mktemp("swinir"), "dtkd_tiny", net, "student")


def export_cli(run: Path, out: Path, *extra: str) -> str:
    argv = ["export", "--format", "onnx", "--raw", "--checkpoint", str(run), *extra, str(out)]
    assert upscale_main(argv) == 0
    return str(out)


@pytest.fixture(scope="module")
def exported(resshift_run, swinir_run, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    runs = {"resshift": resshift_run, "swinir": swinir_run}
    return {name: Path(export_cli(run, folder / f"{name}.onnx")) for name, run in runs.items()}


def photo(size: int, batch: int = 1) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(np.asarray(data.astronaut())).permute(2, 0, 1).float() / 255
    top = [100 + 20 * i for i in range(batch)]
    return torch.stack([img[:, t : t + size[0], 150 : 150 + size[1]] for t in top])


@pytest.mark.parametrize("name", ["resshift", "swinir"])
def test_onnx_student_matches_pytorch_on_two_sizes(name, exported, resshift_run, swinir_run):
    run = {"resshift": resshift_run, "swinir": swinir_run}[name]
    torch_student = load_predictor(run, "raw", "one", device="cpu", seed=5)
    onnx_student = load_predictor(exported[name], "raw", "one", device="cpu", seed=5)
    assert isinstance(onnx_student, OnnxResShiftOneStep) == (name == "resshift")
    assert onnx_student.scale == torch_student.scale == 4
    for shape in [(1, 3, 19, 26), (2, 3, 12, 10)]:  # neither is a size the export checked
        lq = photo(shape[-2:], shape[0])
        sr_torch, sr_onnx = torch_student(lq), onnx_student(lq)
        assert sr_onnx.shape == sr_torch.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
        diff = float((sr_onnx - sr_torch).abs().max())
        assert diff <= BOUNDS["fp32"], f"{name} {shape}: max abs difference {diff}"


def test_export_records_its_check(exported):
    meta = onnx_predictor(exported["resshift"]).meta
    assert meta["family"] == "resshift" and meta["opset"] == "17" and meta["dtype"] == "fp32"
    assert float(meta["max_abs_diff"]) <= BOUNDS["fp32"] and meta["bound"] == "0.0001"


def test_upscale_with_onnx_writes_the_same_image(exported, resshift_run, tmp_path):
    lq = (photo((40, 36))[0].permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(lq).save(tmp_path / "lq.png")
    images = {}
    for name, checkpoint in {"torch": resshift_run, "onnx": exported["resshift"]}.items():
        out = tmp_path / f"{name}.png"
        argv = ["--checkpoint", str(checkpoint), "--raw", "--device", "cpu", "--seed", "2",
                "--tile", "24", "--overlap", "8", str(tmp_path / "lq.png"), str(out)]  # fmt: skip
        assert upscale_main(argv) == 0
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert images["onnx"].shape == images["torch"].shape == (160, 144, 3)
    assert np.abs(images["onnx"] - images["torch"]).max() <= 1


def test_fp16_export_within_its_bound(swinir_run, tmp_path, capsys):
    out = export_cli(swinir_run, tmp_path / "swinir_fp16.onnx", "--dtype", "fp16")
    lines = [line for line in capsys.readouterr().out.splitlines() if "onnx check" in line]
    assert len(lines) == 2 and all("(bound 0.01)" in line for line in lines)  # printed
    student = onnx_predictor(out)
    assert student.dtype == np.float16 and student.session.get_inputs()[0].type == "tensor(float16)"
    lq = photo((17, 22))
    sr = load_predictor(swinir_run, "raw", device="cpu")(lq)
    assert float((student(lq) - sr).abs().max()) <= BOUNDS["fp16"]
    assert upscale_main(["export", "--format", "onnx", "--checkpoint", str(swinir_run), "--raw",
                         "--dtype", "bf16", str(tmp_path / "b.onnx")]) == 2  # fmt: skip
    assert "no bfloat16 Conv" in capsys.readouterr().err


class WidthBranch(torch.nn.Module):
    """A net whose Python branch on the input width a trace freezes: the export must fail."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3 * 4, 3, padding=1)
        self.shuffle = torch.nn.PixelShuffle(2)

    def forward(self, x):
        y = self.shuffle(self.conv(x))
        return y if x.shape[-1] % 2 else 1 - y


def test_failed_check_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(OnnxCheckError, match="does not reproduce the PyTorch student"):
        export_predictor(SRNet(WidthBranch(), 2), out, "sr")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_resshift_with_vq_f4_end_to_end(tmp_path, capsys):
    """Latent ResShift: a (tiny, random) VQ-f4 encodes the upsampled lq and decodes with
    quantisation inside the graph; lq sizes that need padding to the UNet's multiple."""
    from distsr.models.autoencoder import AutoencoderConfig, VQAutoencoder
    from distsr.models.resshift import ResShift, ResShiftSpec
    from distsr.models.vq import build_vq_f4

    torch.manual_seed(0)
    unet = {**run_config("resshift_tiny").method.unet, "image_size": 8, "lq_size": 8,
            "attention_resolutions": [4]}  # fmt: skip
    spec = ResShiftSpec(unet=unet, autoencoder=AutoencoderConfig(kind="pixel"), scale=4)
    vq = build_vq_f4(block_out_channels=[32, 32, 32], layers_per_block=1, num_vq_embeddings=64,
                     norm_num_groups=8)  # fmt: skip
    model = ResShift(spec, autoencoder=VQAutoencoder(vq=vq))
    student = ResShiftOneStep(model, seed=1)
    assert student.factor == 4 and student.multiple == 8
    meta = export_predictor(student, tmp_path / "vq.onnx", "resshift")
    assert meta["distsr.latent_factor"] == "4" and meta["distsr.multiple"] == "8"
    onnx_student = onnx_predictor(tmp_path / "vq.onnx", seed=1)
    lq = photo((13, 10))
    assert onnx_student.draw_noise(lq).shape == (1, 3, 13, 10)
    assert float((onnx_student(lq) - student(lq)).abs().max()) <= BOUNDS["fp32"]
    with pytest.raises(ValueError, match="too small for this graph's reflect pad"):
        onnx_student(photo((3, 16)))  # a pad of 5 rows cannot mirror 3


def test_fasrer_student_with_its_prior_diffusion(tmp_path):
    """FASRer (FFT attention and FFN) and the prior's T reverse steps in one graph (dynamo
    exporter, opset 20); the ONNX student draws the PyTorch student's seeded prior noise and
    runs whole images under ``upscale_tiled`` (the PyTorch student's untiled output)."""
    from distsr.inference.fkdiff import FASRerPredictor
    from distsr.inference.tiling import upscale_tiled
    from distsr.models.fkdiff import CFE_TINY, FASRER_S_TINY, PRIOR_TINY, FASRer, PriorSchedule
    from distsr.teachers.fkdiff import PriorNets

    torch.manual_seed(0)
    prior = PriorNets(CFE_TINY, PRIOR_TINY)
    student = FASRerPredictor(FASRer(FASRER_S_TINY), prior, PriorSchedule(PRIOR_TINY), seed=2)
    meta = export_predictor(student, tmp_path / "fasrer.onnx", "fasrer")
    assert meta["distsr.opset"] == "20" and float(meta["distsr.max_abs_diff"]) <= BOUNDS["fp32"]
    onnx_student = onnx_predictor(tmp_path / "fasrer.onnx", seed=2)
    lq = photo((20, 27), batch=2)
    sr = upscale_tiled(onnx_student, lq, 4, tile=16, overlap=4)  # the whole image at once
    assert sr.shape == (2, 3, 80, 108)
    assert float((sr - student(lq)).abs().max()) <= BOUNDS["fp32"]
