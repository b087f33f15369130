"""The command line end to end on a tiny setting, and bad input -> one line + exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seglab.cli import main
from seglab.engine.int8 import cpu_runs_int8

TINY = {
    "model_kwargs": {"base_channels": 4, "depth": 2},
    "image_size": 64,
    "train_samples": 16,
    "val_samples": 8,
    "batch_size": 8,
    "num_overlays": 1,
    "precision": "32",  # `seglab eval` defaults to exact float32; train in it too so figures compare exactly
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`seglab train` for one epoch on a few 64x64 synthetic images; returns the run directory."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--epochs", "1", "--out", str(root / "runs"), "--name", "tiny"]) == 0
    return root / "runs" / "tiny"


def _one_error_line(capsys: pytest.CaptureFixture, code: int, fragment: str) -> None:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("seglab: error:") and fragment in err, err


def test_train_writes_a_complete_run(trained: Path) -> None:
    for name in ("best.safetensors", "best.json", "last.safetensors", "resume.pt", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (trained / name).is_file(), name
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1] and 0 <= rows[0]["miou"] <= 1
    assert list((trained / "overlays").glob("*.png"))


def test_eval_prints_the_table_and_writes_json(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(trained), "--json", str(out)]) == 0
    assert "mean" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    saved = json.loads((trained / "best.json").read_text())["metrics"]
    assert metrics["miou"] == pytest.approx(saved["miou"], abs=1e-6)  # same val split as in training
    assert set(metrics["iou"]) == set(json.loads((trained / "best.json").read_text())["classes"])


def test_eval_refuses_an_unusable_json_path_before_evaluating(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["eval", "--checkpoint", str(trained), "--json", str(blocker / "metrics.json")]) == 2
    captured = capsys.readouterr()
    assert "is not a folder" in captured.err and "mean" not in captured.out  # no evaluation ran first


def test_eval_refuses_data_of_another_class_count_and_warns_of_other_names(trained: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    classes = json.loads((trained / "best.json").read_text())["classes"]
    rng = np.random.default_rng(0)
    for index in range(2):
        for folder, pixels in (("images", rng.integers(0, 256, (16, 16, 3))), ("masks", np.full((16, 16), index))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / folder / f"{index}.png")
    (tmp_path / "data" / "classes.yaml").write_text(yaml.safe_dump({"classes": ["sky", "road"]}))
    command = ["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "data"), "--split", "val", "--precision", "32"]
    _one_error_line(capsys, main(command), f"has 2 classes (sky, road) but the checkpoint predicts {len(classes)}")
    renamed = [f"name{k}" for k in range(len(classes))]
    (tmp_path / "data" / "classes.yaml").write_text(yaml.safe_dump({"classes": renamed}))
    with pytest.warns(UserWarning, match=f"names its classes {', '.join(renamed[:6])}.*scored by index"):
        assert main(command) == 0


def test_predict_writes_a_mask_and_an_overlay_per_image(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(images / f"{index}.png")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(trained), str(images), "--out", str(out), "--tile", "48", "--tta-flips", "h"]) == 0
    masks = sorted(out.glob("*_mask.png"))
    assert [p.name for p in masks] == ["0_mask.png", "1_mask.png", "2_mask.png"]
    assert np.asarray(Image.open(masks[0])).shape == (64, 80) and len(list(out.glob("*_overlay.png"))) == 3
    masks_only = tmp_path / "masks-only"
    assert main(["predict", "--checkpoint", str(trained), str(images), "--out", str(masks_only), "--tile", "48",
                 "--tta-flips", "h", "--no-overlays"]) == 0
    assert sorted(p.name for p in masks_only.iterdir()) == [p.name for p in masks]
    assert all(np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(masks_only / mask.name))) for mask in masks)


@pytest.mark.parametrize(("options", "message"), [
    (["--overlap", "0.5"], "--overlap: only with --tile"),
    (["--tile-batch", "2"], "--tile-batch: only with --tile"),
    (["--calibration-images", "4"], "--calibration-images: only with --precision int8"),
])
def test_predict_refuses_options_that_would_do_nothing(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       options: list[str], message: str) -> None:
    # Before, each was taken and ignored.
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / "out"), *options]) == 2
    assert capsys.readouterr().err.strip() == f"seglab: error: {message}" + (" (sliding-window prediction)" if "tile" in message else "")


def test_predict_skips_an_unreadable_image_names_it_and_exits_non_zero(trained: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in (0, 2):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{index}.png")
    (images / "1.png").write_bytes(b"not a png")  # sorted between the good ones: the later one is still predicted
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(trained), str(images), "--out", str(out), "--no-overlays"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["0_mask.png", "2_mask.png"]
    captured = capsys.readouterr()
    assert "2 image(s) predicted" in captured.out
    assert captured.err.strip().splitlines() == [f"seglab: error: skipped {images / '1.png'} is not a readable image (UnidentifiedImageError)"]


def test_instance_options_are_refused_for_a_semantic_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["predict", "--checkpoint", str(trained), str(tmp_path), "--out", str(tmp_path / "o"), "--score-threshold", "0.3"])
    _one_error_line(capsys, code, "--score-threshold: for instance and keypoint models only")


def test_missing_image(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["predict", "--checkpoint", str(trained), str(tmp_path / "nope.png"), "--out", str(tmp_path)])
    _one_error_line(capsys, code, "nope.png does not exist")


def test_unreadable_and_non_image_files(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    code = main(["predict", "--checkpoint", str(trained), str(tmp_path / "broken.png"), "--out", str(tmp_path / "o")])
    _one_error_line(capsys, code, "broken.png is not a readable image")
    (tmp_path / "notes.txt").write_text("hello")
    code = main(["predict", "--checkpoint", str(trained), str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")])
    _one_error_line(capsys, code, "notes.txt is not a readable image")


def test_missing_and_foreign_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _one_error_line(capsys, main(["eval", "--checkpoint", str(tmp_path / "none.safetensors")]), "does not exist")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "model.json").write_text('{"hello": 1}')
    _one_error_line(capsys, main(["eval", "--checkpoint", str(tmp_path / "model.safetensors")]), "is not a seglab checkpoint")


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_image_sizes_under_eight_pixels_are_refused_by_every_command(command: str, capsys: pytest.CaptureFixture) -> None:
    # `seglab eval --image-size 7` scored 7 x 7 images that training would have refused
    with pytest.raises(SystemExit) as stop:
        main([command, *([] if command == "train" else ["--checkpoint", "run"]), "--image-size", "7"])
    assert stop.value.code == 2
    assert "--image-size: must be at least 8 pixels a side, not '7'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, *([] if command == "train" else ["--checkpoint", "run"]), "--image-size", "64x4"])


def test_unknown_model_and_negative_epochs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _one_error_line(capsys, main(["train", "--model", "no-such-net", "--out", str(tmp_path)]), "no-such-net")
    _one_error_line(capsys, main(["train", "--epochs", "-1", "--out", str(tmp_path)]), "--epochs must be a positive number")
    # a model of another task than --task's, or one seglab train cannot train: one line, not a traceback mid-run
    _one_error_line(capsys, main(["train", "--task", "semantic", "--model", "yolact", "--out", str(tmp_path)]),
                    "--model yolact is an instance model, not a semantic one")
    _one_error_line(capsys, main(["train", "--task", "instance", "--model", "unet", "--out", str(tmp_path)]),
                    "--model unet is a semantic model, not an instance one")
    _one_error_line(capsys, main(["train", "--task", "instance", "--model", "keypoint_rcnn", "--out", str(tmp_path)]),
                    "--model keypoint_rcnn is a keypoint model, not an instance one")
    assert not any(tmp_path.iterdir())  # nothing written for a refused run


def test_the_task_follows_the_model_where_none_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import seglab.engine.instance as instance

    handed = []
    monkeypatch.setattr(instance, "train_instance", lambda values, console: handed.append(values) or 0)
    assert main(["train", "--model", "mask_rcnn", "--out", str(tmp_path)]) == 0
    assert handed[0]["task"] == "instance" and handed[0]["model"] == "mask_rcnn"

    import seglab.engine.keypoints as keypoints

    monkeypatch.setattr(keypoints, "train_keypoints", lambda values, console: handed.append(values) or 0)
    assert main(["train", "--model", "keypoint_rcnn", "--out", str(tmp_path)]) == 0
    assert handed[1]["task"] == "keypoint"


def test_folder_data_of_mixed_sizes_or_with_num_classes_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for name, (height, width) in {"a": (16, 16), "b": (16, 16), "c": (24, 16), "d": (24, 16)}.items():
        for folder, pixels in (("images", rng.integers(0, 256, (height, width, 3))), ("masks", rng.integers(0, 2, (height, width)))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / folder / f"{name}.png")
    data, out = str(tmp_path / "data"), str(tmp_path / "runs")
    # images batched as they are need one size: said before training, not a stack error mid-epoch
    assert main(["train", "--data", data, "--batch-size", "2", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "image sizes: 2 different" in err and "--image-size" in err and "Traceback" not in err
    # --num-classes is the synthetic set's; a data set's classes are its own
    _one_error_line(capsys, main(["train", "--data", data, "--num-classes", "3", "--out", out]), "--num-classes")
    # so are the synthetic set's sizes: a data set is trained on all its images
    _one_error_line(capsys, main(["train", "--data", data, "--train-samples", "3", "--val-samples", "2", "--out", out]),
                    "--train-samples, --val-samples: for the synthetic set only")
    _one_error_line(capsys, main(["train", "--task", "instance", "--data", data, "--train-samples", "3", "--out", out]),
                    "--train-samples: for the synthetic set only")
    assert not (tmp_path / "runs").exists()


def test_eval_scores_images_of_several_sizes_as_they_are(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(1)
    for k in range(6):
        height, width = (16, 16) if k % 2 else (24, 16)
        for folder, pixels in (("images", rng.integers(0, 256, (height, width, 3))), ("masks", rng.integers(0, 2, (height, width)))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / folder / f"{k}.png")
    run = tmp_path / "runs" / "mixed"
    assert main(["train", "--data", str(tmp_path / "data"), "--batch-size", "1", "--epochs", "1", "--precision", "32",
                 "--model-option", "base_channels=4", "--model-option", "depth=2",
                 "--out", str(tmp_path / "runs"), "--name", "mixed"]) == 0
    scores = []
    for batch in ("4", "1", "4"):  # batches of one size each; the train split without random augmentation
        out = tmp_path / f"metrics{len(scores)}.json"
        assert main(["eval", "--checkpoint", str(run), "--split", "train", "--batch-size", batch, "--precision", "32",
                     "--json", str(out)]) == 0
        scores.append(json.loads(out.read_text())["miou"])
    capsys.readouterr()
    assert scores[0] == scores[1] == scores[2]


def test_bad_resume_and_precision(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _one_error_line(capsys, main(["train", "--resume", str(tmp_path / "gone")]), "not a seglab run directory")
    _one_error_line(capsys, main(["train", "--precision", "16", "--out", str(tmp_path)]), "needs a CUDA device")


def test_model_options_merge_over_the_config(tmp_path: Path) -> None:
    """--model-option KEY=VALUE (YAML values) wins over the config's model_kwargs, key by key."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "train_samples": 8, "val_samples": 4}))
    args = ["train", "--config", str(tmp_path / "tiny.yaml"), "--epochs", "1", "--out", str(tmp_path / "runs"), "--name", "opt"]
    assert main([*args, "--model-option", "base_channels=6"]) == 0
    kwargs = json.loads((tmp_path / "runs" / "opt" / "best.json").read_text())["kwargs"]
    assert kwargs["base_channels"] == 6 and kwargs["depth"] == 2


def test_bad_model_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses the shape of the flag itself
        main(["train", "--model-option", "no-equals-sign", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    _one_error_line(capsys, main(["train", "--model-option", "wings=3", "--out", str(tmp_path)]), "wings")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_direct_convolutions_reach_the_fast_path(command: str, trained: Path, tmp_path: Path, monkeypatch) -> None:
    import seglab.engine.fastpath as fastpath
    import seglab.engine.predictor as predictor

    asked = []
    real = fastpath.optimize_for_inference

    def recording(model, precision="auto", **options):
        asked.append(options.get("winograd", True))
        return real(model, precision, **options)

    monkeypatch.setattr(fastpath, "optimize_for_inference", recording)
    monkeypatch.setattr(predictor, "optimize_for_inference", recording)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    arguments = ["--checkpoint", str(trained)] + ([str(image), "--out", str(tmp_path / "out")] if command == "predict" else [])
    assert main([command, *arguments]) == 0
    assert main([command, *arguments, "--direct-convolutions"]) == 0
    assert asked == [True, False]


needs_int8 = pytest.mark.skipif(not cpu_runs_int8(), reason="this CPU has no VNNI or AMX 8-bit products")


@needs_int8
def test_eval_with_int8_calibrates_on_the_train_split(trained: Path, tmp_path: Path, monkeypatch) -> None:
    import seglab.engine.fastpath as fastpath

    calibrated = []
    real = fastpath.use_int8_convolutions

    def recording(model, batches, ranges=None):
        batches = list(batches)
        calibrated.append(len(batches))
        return real(model, batches, ranges=ranges)

    monkeypatch.setattr(fastpath, "use_int8_convolutions", recording)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(trained), "--precision", "int8", "--calibration-images", "5",
                 "--json", str(out)]) == 0
    assert calibrated == [5]
    saved = json.loads((trained / "best.json").read_text())["metrics"]
    assert json.loads(out.read_text())["miou"] == pytest.approx(saved["miou"], abs=0.05)


@needs_int8
def test_predict_with_int8_and_calibration_images(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{index}.png")
    for extra in ([], ["--calibration", str(images / "1.png")]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["predict", "--checkpoint", str(trained), str(images), "--out", str(out), "--precision", "int8",
                     *extra]) == 0
        assert len(list(out.glob("*_mask.png"))) == 2


@needs_int8
def test_train_stores_int8_ranges_and_predict_says_it_uses_them(trained: Path, tmp_path: Path, capsys) -> None:
    from seglab.engine.fastpath import default_precision
    from seglab.engine.precision import cpu_has

    assert "int8" in json.loads((trained / "best.json").read_text())
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    for precision, words in (("int8", "int8 (the checkpoint's ranges"), ("32", "in float32;")):
        assert main(["predict", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / precision),
                     "--precision", precision]) == 0
        assert words in " ".join(capsys.readouterr().out.split())
    assert main(["predict", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / "auto")]) == 0
    # int8 where float32 is the fast default, or bf16 without AMX (this is a network of convolutions)
    amx_bf16 = default_precision("cpu") == "bf16" and cpu_has("amx_tile")
    expected = "in bf16;" if amx_bf16 else "int8 (the checkpoint's ranges"
    said = " ".join(capsys.readouterr().out.split())
    assert expected in said
    if default_precision("cpu") == "bf16" and not amx_bf16:
        assert "--precision bf16 for bf16, 32 for float32)" in said


@needs_int8
def test_eval_stores_int8_ranges_for_a_checkpoint_that_has_none(trained: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "best.json").read_text())
    stored_by_training = config.pop("int8")
    (run / "best.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(run), "--precision", "int8", "--store-int8-ranges"]) == 0
    assert "within 0.2 points" in " ".join(capsys.readouterr().err.split())
    record = json.loads((run / "best.json").read_text())["int8"]
    # the same 16 train images as the training run's own calibration, so the same ranges
    assert record["ranges"] == stored_by_training["ranges"] and record["images"] == stored_by_training["images"]
    assert record["miou_float32"] == pytest.approx(config["metrics"]["miou"], abs=0.01)
    assert record["miou_int8"] == pytest.approx(stored_by_training["miou_int8"], abs=1e-9)  # the val split both times
    for extra, fragment in (([], "only with --precision int8"), (["--precision", "int8", "--crf"], "drop --crf")):
        _one_error_line(capsys, main(["eval", "--checkpoint", str(run), "--store-int8-ranges", *extra]), fragment)


@needs_int8
def test_eval_auto_scores_what_predict_runs_by_default(trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import seglab.engine.int8_checkpoint as int8_checkpoint

    # as on a processor without native bfloat16 (the Xeon this was written on), wherever this runs
    monkeypatch.setattr(int8_checkpoint, "default_precision", lambda device: "32")
    outputs = {}
    for precision in ("auto", "int8"):
        outputs[precision] = tmp_path / f"{precision}.json"
        assert main(["eval", "--checkpoint", str(trained), "--precision", precision, "--json", str(outputs[precision])]) == 0
    assert "--precision auto: int8 with the checkpoint's int8 ranges" in " ".join(capsys.readouterr().err.split())
    # the stored ranges are those int8 calibrates on anew: the same figures
    assert json.loads(outputs["auto"].read_text())["miou"] == json.loads(outputs["int8"].read_text())["miou"]


def test_int8_options_refused_with_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    predict = ["predict", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / "out")]
    _one_error_line(capsys, main([*predict, "--calibration", str(image)]), "--calibration: only with --precision int8")
    monkeypatch.setattr("seglab.engine.int8.cpu_runs_int8", lambda: False)
    _one_error_line(capsys, main(["eval", "--checkpoint", str(trained), "--precision", "int8"]), "VNNI or AMX")
    _one_error_line(capsys, main([*predict, "--precision", "int8"]), "VNNI or AMX")
    train = ["train", "--out", str(tmp_path / "runs"), "--epochs", "1", "--train-samples", "4", "--val-samples", "2",
             "--int8-products"]
    _one_error_line(capsys, main(train), "--int8-products: needs a CPU with VNNI or AMX")


@needs_int8
def test_eval_with_int8_needs_a_train_split_to_calibrate_on(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for kind in ("images", "masks"):
        (tmp_path / kind / "val").mkdir(parents=True)
    for index in range(2):
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "val" / f"{index}.png")
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "masks" / "val" / f"{index}.png")
    classes = json.loads((trained / "best.json").read_text())["classes"]
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"classes": classes}))  # the checkpoint's, so only int8 is at issue
    code = main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path), "--split", "val", "--precision", "int8"])
    _one_error_line(capsys, code, "train split")


def test_train_takes_int8_products_on_off_or_unset() -> None:
    from seglab.cli import build_parser

    def parsed(*flags: str) -> bool | None:
        return build_parser().parse_args(["train", *flags]).int8_products

    assert (parsed(), parsed("--int8-products"), parsed("--no-int8-products")) == (None, True, False)


def test_data_check_refuses_an_unusable_json_path_before_reading_the_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["data", "check", str(tmp_path / "no-such-set"), "--json", str(blocker / "report.json")]) == 2
    assert "a-file as the output folder: it exists and is not a folder" in capsys.readouterr().err  # not the missing set
