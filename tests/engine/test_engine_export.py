"""`seglab export`: ONNX (checked against PyTorch with onnxruntime) and TorchScript, dynamic sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seglab.cli import main
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.exporting import NormalizedModel


def _reference(run: Path, images: torch.Tensor) -> torch.Tensor:
    model, config = load_checkpoint(run)
    with torch.no_grad():
        return NormalizedModel(model, config["mean"], config["std"]).eval()(images)


def test_onnx_export_matches_pytorch_at_several_sizes(tiny_run: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the [onnx] extra")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "onnx", "--out", str(out), "--legacy-onnx"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 32), (2, 3, 48, 80)]:  # another batch and size than the traced one
        images = torch.rand(*shape)
        (logits,) = session.run(None, {"image": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), _reference(tiny_run, images), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_export_runs_at_a_new_size(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    images = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), _reference(tiny_run, images), atol=1e-5, rtol=1e-5)


def test_export_to_a_missing_folder_is_one_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["export", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "nowhere" / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("seglab: error: export folder")


def test_default_export_name_keeps_the_checkpoints_dots(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint named "model.v2" exports as model.v2.pt in the current folder, not model.pt.
    from seglab.engine.checkpoint import resolve_checkpoint

    stem = resolve_checkpoint(tiny_run)
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"model.v2{suffix}").write_bytes(stem.with_name(stem.name + suffix).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", "model.v2", "--format", "torchscript"]) == 0
    assert (tmp_path / "model.v2.pt").is_file() and not (tmp_path / "model.pt").exists()
    assert main(["export", "--checkpoint", "model.v2.safetensors", "--format", "torchscript"]) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_into_a_folder_writes_the_checkpoints_name_there_with_the_usual_permissions(tiny_run: Path, tmp_path: Path) -> None:
    import os
    import stat

    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "torchscript", "--out", str(folder)]) == 0
    written = folder / f"{tiny_run.name}.pt"
    assert sorted(p.name for p in folder.iterdir()) == [written.name]  # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    torch.jit.load(str(written))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_an_out_ending_in_a_slash_is_a_folder_made_for_the_export(tiny_run: Path, tmp_path: Path) -> None:
    # Before, `--out exports/` wrote a file named "exports".
    folder = tmp_path / "new" / "exports"
    assert main(["export", "--checkpoint", str(tiny_run), "--format", "torchscript", "--out", f"{folder}/"]) == 0
    assert folder.is_dir() and (folder / f"{tiny_run.name}.pt").is_file()
