"""`seglab bench` machinery on tiny settings: one small model, 64x64, one repeat."""
import json
import mmap

import numpy as np
import pytest
import torch

from seglab.bench import (
    INT8_TRAINING_VARIANT,
    INT8_VARIANT,
    BenchSettings,
    comparison_rows,
    run_bench,
    speed_ratio,
    time_interleaved,
    to_markdown,
)
import seglab.bench as bench_module
from seglab.engine.int8 import cpu_runs_int8
from seglab.bench_accuracy import accuracy_check, background_only_miou
from seglab.cli import main
from seglab.models.profile import describe_model


def test_time_interleaved_times_each_call_in_rounds():
    calls = []
    seconds = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"), 1, 3)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up of each, then rounds
    assert [len(s) for s in seconds] == [3, 3] and all(t >= 0 for s in seconds for t in s)


def test_timed_rounds_record_the_kernel_time_of_fresh_memory():
    from seglab.bench import timed_rounds

    def touch_fresh_memory():  # 256 MB mapped afresh (not from malloc's heap), written page by page
        with mmap.mmap(-1, 1 << 28) as memory:
            pages = np.frombuffer(memory, dtype=np.uint8)
            pages[::4096] = 1
            del pages

    seconds, system = timed_rounds([touch_fresh_memory, lambda: None], torch.device("cpu"), 0, 2)
    assert [len(s) for s in system] == [2, 2] and all(t >= 0 for s in system for t in s)
    assert sum(system[0]) > 0  # faulting in 131072 fresh pages takes the kernel measurable time


@pytest.mark.parametrize("settle_rounds, calls_made, timed_system", [(5, 6, [0.0, 0.0]), (1, 4, [1.0, 0.0])])
def test_warm_up_goes_on_while_calls_still_fault(monkeypatch, settle_rounds, calls_made, timed_system):
    """A call's first three runs take a (faked) second in the kernel each: the settling rounds
    go on until a round is clean, or until they run out and the timed rounds show it."""
    import seglab.bench as bench

    kernel = [0.0]
    monkeypatch.setattr(bench, "_system_seconds", lambda: kernel[0])
    calls = []

    def faulting_at_first():
        calls.append(1)
        if len(calls) <= 3:
            kernel[0] += 1.0

    seconds, system = bench.timed_rounds([faulting_at_first], torch.device("cpu"), 1, 2, settle_rounds)
    assert len(calls) == calls_made and system == [timed_system] and len(seconds[0]) == 2


def test_markdown_names_rows_that_spent_their_time_in_the_kernel():
    from seglab.bench import system_share

    row = dict(device="cpu", model="unet-r34", mode="train", batch=4, library="seglab", variant="fast (32)",
               seconds=[2.0, 2.0], system_seconds=[0.9, 0.1], images_per_s=2.0, gflops_per_image=1.0,
               fraction_of_peak=None)
    warm = {**row, "variant": "eager fp32", "system_seconds": [0.01, 0.01]}
    assert system_share(row) == pytest.approx(0.25) and system_share({**row, "system_seconds": None}) is None
    results = dict(machine={}, settings=dict(calibration_size=16, size=64, num_classes=21, repeats=2, warmup=0,
                                             ablation=[]), calibration={"cpu": {"before": {}, "after": {}}},
                   rows=[row, warm])
    markdown = to_markdown(results)
    assert "UNet-R34 train batch 4, seglab fast (32): 25% (0.90, 0.10)" in markdown
    assert "seglab eager fp32:" not in markdown


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="unknown architecture 'unet-r99'"):
        BenchSettings(models=["unet-r99"]).validate()
    with pytest.raises(ValueError, match="^--ablation: unknown architecture 'fcn'"):
        BenchSettings(ablation=["fcn"]).validate()
    with pytest.raises(ValueError, match="--size"):
        BenchSettings(size=100).validate()
    with pytest.raises(ValueError, match="--train-batch"):
        BenchSettings(train_batch=1).validate()
    with pytest.raises(ValueError, match="--device"):
        BenchSettings(devices=["tpu"]).validate()
    with pytest.raises(ValueError, match="--settle-rounds"):
        BenchSettings(settle_rounds=-1).validate()
    with pytest.raises(ValueError, match="float16"):
        BenchSettings(devices=["cpu"], precision="16").validate()


def test_cli_rejects_an_unknown_model_with_exit_code_2(capsys):
    assert main(["bench", "--models", "nope", "--out", "unused"]) == 2
    assert "nope" in capsys.readouterr().err


def test_an_unusable_out_is_refused_before_the_run(tmp_path, capsys):
    # Before, a bench ran to its end and then failed to write its results.
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert main(["bench", "--models", "unet-r34", "--out", str(taken)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bench_command_writes_json_and_markdown_with_peer_ratios(tmp_path):
    code = main(["bench", "--models", "segformer-b0", "--size", "64", "--batch", "1", "--train-batch", "2",
                 "--repeats", "1", "--warmup", "0", "--ablation", "segformer-b0", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = results["rows"]
    calibration = results["calibration"]["cpu"]
    assert calibration["before"]["fp32"] > 0 and calibration["after"]["fp32"] > 0
    kinds = {(r["library"], r["variant"], r["mode"]) for r in rows}
    assert ("smp", "eager fp32", "inference") in kinds and ("smp", "eager fp32", "train") in kinds
    assert ("seglab", "eager fp32", "inference") in kinds and ("seglab", "+fold_conv_bn", "inference") in kinds
    assert ("seglab", "+fused optimizer", "train") in kinds
    assert ("seglab", "+native_segformer", "inference") in kinds
    assert ("seglab", "+bf16 +native_segformer", "inference") in kinds
    assert ("seglab", "+channels_last +planar_heads", "inference") in kinds
    assert all(r["images_per_s"] > 0 and len(r["seconds"]) == len(r["system_seconds"]) == 1 for r in rows)
    # FLOPs agree with the model profile's count on the meta device (where attention runs as
    # plain matrix products), so the CPU attention kernel is counted; GFLOP/s follow from them.
    gflops = describe_model("segformer", num_classes=21, image_size=64, variant="b0")["gflops"]
    plain = next(r for r in rows if r["library"] == "seglab" and r["variant"] == "eager fp32" and r["mode"] == "inference")
    assert plain["gflops_per_image"] == pytest.approx(gflops, rel=1e-3)
    peer = next(r for r in rows if r["library"] == "smp" and r["mode"] == "inference")
    # The same network (parameters) as smp's, computed with fewer FLOPs (the re-associated decoder).
    assert peer["parameters"] == plain["parameters"] and plain["gflops_per_image"] < peer["gflops_per_image"]
    assert plain["achieved_gflops"] == pytest.approx(plain["gflops_per_image"] * plain["images_per_s"])
    assert plain["peak_gflops"] > 0
    assert plain["fraction_of_peak"] == pytest.approx(plain["achieved_gflops"] / plain["peak_gflops"])
    line = next(c for c in comparison_rows(results) if c["mode"] == "inference")
    assert line["ratio"] == pytest.approx(line["seglab fast"] / line["peer fp32"])  # one round: the same
    assert line["same net"] is True
    markdown = (tmp_path / "bench.md").read_text()
    assert "SegFormer-B0" in markdown and "| ratio |" in markdown
    assert "Ablation" in markdown and markdown == to_markdown(results)


def test_run_bench_without_peers_or_training_measures_only_seglab():
    settings = BenchSettings(models=["segformer-b0"], size=32, batches=[2], peers=False, train=False, repeats=1,
                             warmup=0, calibration_size=16, int8=False)
    results = run_bench(settings)
    assert {r["library"] for r in results["rows"]} == {"seglab"}
    assert {r["mode"] for r in results["rows"]} == {"inference"}
    assert [r["batch"] for r in results["rows"]] == [2, 2]


@pytest.mark.skipif(not cpu_runs_int8(), reason="this CPU has no VNNI or AMX 8-bit products")
def test_the_int8_row_is_timed_with_the_others_and_compared_with_the_peer():
    settings = BenchSettings(models=["fpn-r34"], size=64, batches=[1], train=False, repeats=2, warmup=0,
                             calibration_size=16, int8=True)
    results = run_bench(settings)
    int8 = next(r for r in results["rows"] if r["variant"] == INT8_VARIANT)
    peer = next(r for r in results["rows"] if r["library"] == "smp")
    assert int8["library"] == "seglab" and int8["precision"] == "int8" and len(int8["seconds"]) == 2
    assert int8["fraction_of_peak"] is None  # no int8 calibration kernel to divide by
    line = comparison_rows(results)[0]
    assert line["int8 ratio"] == pytest.approx(speed_ratio(int8, peer))
    markdown = to_markdown(results)
    assert "int8 ratio" in markdown
    # where the fast path ran float32, or bf16 without AMX, the table says which row `seglab predict`'s default follows
    fast_is_float32 = any(r["variant"] == "fast (32)" for r in results["rows"])
    fast_is_bf16 = any(r["variant"].startswith("fast (") and r.get("precision") == "bf16" for r in results["rows"])
    bf16_note = "(bf16 by AVX-512 BF16, without AMX)" in markdown
    assert bf16_note == (fast_is_bf16 and results["machine"]["cpu_amx"] is False)
    assert ("`seglab predict --precision auto` runs the int8 path" in markdown) == (fast_is_float32 or bf16_note)
    results["machine"]["cpu_amx"] = True  # AMX keeps bf16
    assert "without AMX" not in to_markdown(results)


@pytest.mark.skipif(not cpu_runs_int8(), reason="this CPU has no VNNI or AMX 8-bit products")
def test_the_int8_training_row_runs_the_fast_route_with_int8_products(monkeypatch):
    calls = []
    real = bench_module.training_convolutions
    monkeypatch.setattr("seglab.bench.training_convolutions",
                        lambda *args, **kwargs: calls.append(kwargs["int8_products"]) or real(*args, **kwargs))
    settings = BenchSettings(models=["fpn-r34"], size=64, batches=[1], train_batch=2, repeats=1, warmup=0,
                             settle_rounds=0, calibration_size=16, int8=True)
    results = run_bench(settings)
    row = next(r for r in results["rows"] if r["variant"] == INT8_TRAINING_VARIANT)
    peer = next(r for r in results["rows"] if r["library"] == "smp" and r["mode"] == "train")
    assert row["mode"] == "train" and row["batch"] == 2 and row["fraction_of_peak"] is None
    assert sorted(calls) == [False, False, False, True]  # eager fp32, fast, int8 products, the peer
    line = next(c for c in comparison_rows(results) if c["mode"] == "train")
    assert line["int8 ratio"] == pytest.approx(speed_ratio(row, peer))
    # where the fast path ran float32, the table says that `seglab train`'s default is the int8 row
    fast_is_float32 = any(r["variant"] == "fast (32)" for r in results["rows"])
    assert ("`seglab train --precision auto` (the default) trains as the int8" in to_markdown(results)) == fast_is_float32


def test_int8_is_refused_by_the_settings_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr("seglab.bench.cpu_runs_int8", lambda: False)
    with pytest.raises(ValueError, match="--int8"):
        BenchSettings(models=["fpn-r34"], int8=True).validate()
    assert not BenchSettings(models=["fpn-r34"]).int8_on(torch.device("cpu"))  # the default follows the CPU


def test_accuracy_check_reports_consistent_figures():
    report = accuracy_check("segformer-b0", epochs=1, image_size=32, train_samples=16, val_samples=8, batch_size=8)
    assert "of 2 classes" in report["setup"]  # one shape kind against the background, by default
    for key in ("miou_background_only", "miou_fp32", "miou_fast_inference", "miou_fast_training"):
        assert 0.0 <= report[key] <= 100.0
    assert report["miou_fast_inference_delta"] == pytest.approx(report["miou_fast_inference"] - report["miou_fp32"])
    assert 0.9 <= report["argmax_agreement"] <= 1.0
    if cpu_runs_int8():  # the calibrated int8 inference path of the same model
        assert 0.0 <= report["miou_int8_inference"] <= 100.0 and 0.5 <= report["int8_argmax_agreement"] <= 1.0
        assert report["miou_int8_inference_delta"] == pytest.approx(report["miou_int8_inference"] - report["miou_fp32"])
        assert 0.0 <= report["miou_int8_training"] <= 100.0  # trained with int8 products, same seed and data order
        assert report["miou_int8_training_delta"] == pytest.approx(report["miou_int8_training"] - report["miou_fp32"])


def test_accuracy_check_takes_the_number_of_classes():
    report = accuracy_check("segformer-b0", epochs=1, num_classes=4, image_size=32, train_samples=16, val_samples=8,
                            batch_size=8)
    assert "of 4 classes" in report["setup"]
    # the floor: background's IoU is its share of the pixels, the other classes' IoUs are 0
    assert report["miou_background_only"] < 100.0 / 4


def test_background_only_miou_is_the_background_share_over_the_classes():
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, :2] = 1  # a quarter of the pixels are class 1
    assert background_only_miou(masks, 2) == pytest.approx(100.0 * (0.75 + 0.0) / 2)


def test_accuracy_line_says_when_the_model_learned_too_little():
    from seglab.bench import accuracy_line

    report = {"model": "UNet-R34", "miou_background_only": 35.5, "miou_fp32": 79.5, "miou_fast_inference": 79.49,
              "miou_fast_training": 78.2, "argmax_agreement": 0.9996}
    assert accuracy_line(report) == ("accuracy (UNet-R34): mIoU fp32 79.50 (background only 35.50), fast inference "
                                     "79.49, fast training 78.20, argmax agreement 0.9996")
    untrained = accuracy_line({**report, "miou_fp32": 40.0, "miou_fast_inference": 40.0, "argmax_agreement": 1.0})
    assert untrained.splitlines()[1].startswith("the float32 model is within 10 points of painting everything "
                                                "background") and "--accuracy-epochs" in untrained


def test_accuracy_epochs_must_be_positive(capsys):
    with pytest.raises(ValueError, match="--accuracy-epochs must be at least 1"):
        BenchSettings(models=["fpn-r34"], accuracy_epochs=0).validate()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--models", "fpn-r34", "--accuracy", "--accuracy-epochs", "0"])
    assert exit_info.value.code == 2 and "--accuracy-epochs" in capsys.readouterr().err


def test_pspnet_os8_peer_runs_the_papers_dilated_encoder():
    from torch.utils.flop_counter import FlopCounterMode

    from seglab import create_model
    from seglab.bench import ARCHITECTURES

    pytest.importorskip("segmentation_models_pytorch")
    arch = ARCHITECTURES["pspnet-r34-os8"]
    peer = arch.peer_builder(5).eval()
    ours = create_model(arch.seglab_model, num_classes=5, **arch.seglab_kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert peer.encoder(x)[-1].shape[-2:] == (8, 8)  # all five stages, output stride 8
        assert ours.encoder(x)[-1].shape[-2:] == (8, 8)
        flops = []
        for net in (ours, peer):
            with FlopCounterMode(display=False) as counter:
                assert net(x).shape == (1, 5, 64, 64)
            flops.append(counter.get_total_flops())
    # The one difference left: the paper's 3x3 fusion of the pyramid where smp has a 1x1.
    assert 1.1 < flops[0] / flops[1] < 1.3
    smp_default = ARCHITECTURES["pspnet-r34"].peer_builder(5).eval()
    with torch.no_grad():
        assert smp_default.encoder(x)[-1].shape[-2:] == (8, 8)
        assert len(smp_default.encoder(x)) < len(peer.encoder(x))  # cut after the stride-8 stage


def test_the_speed_ratio_is_the_median_of_the_rounds_ratios():
    fast = dict(batch=2, seconds=[1.0, 2.0, 1.0], images_per_s=2.0)
    peer = dict(batch=2, seconds=[2.0, 4.2, 3.0], images_per_s=2 / 3.0)
    # Round 2 ran slow for both (a slow spell); per round the peer took 2x, 2.1x and 3x as long.
    assert speed_ratio(fast, peer) == pytest.approx(2.1)
    # Not timed in the same rounds: the ratio of the medians.
    assert speed_ratio(fast, dict(peer, seconds=[3.0])) == pytest.approx(3.0)
