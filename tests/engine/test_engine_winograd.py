"""When Winograd pays (the training route through it: test_engine_convolutions.py)."""
import seglab.engine.winograd as rule
from seglab.engine.winograd import (
    MIN_INFERENCE_PRODUCTS,
    call_output_tile,
    filter_bound,
    min_channels,
    output_tile,
    pays_for_input,
    tiles,
    upsampling_output_tile,
    winograd_dilation,
)
from seglab.ops import native
from seglab.ops.winograd import BF16_TILE


def test_winograd_takes_same_padded_stride_1_3x3_convolutions_up_to_dilation_4():
    assert winograd_dilation((8, 8, 3, 3), 1, 1, 1, 1) == 1
    assert winograd_dilation((8, 8, 3, 3), (1, 1), (4, 4), (4, 4), 1) == 4
    assert winograd_dilation((8, 8, 3, 3), 1, "same", 2, 1) == 2
    assert winograd_dilation((8, 8, 3, 3), 2, 1, 1, 1) is None  # strided
    assert winograd_dilation((8, 8, 3, 3), 1, 0, 1, 1) is None  # not "same"
    assert winograd_dilation((8, 8, 3, 3), 1, 6, 6, 1) is None  # DilatedConvAsGemm's
    assert winograd_dilation((8, 4, 3, 3), 1, 1, 1, 2) is None  # grouped
    assert winograd_dilation((8, 8, 5, 5), 1, 2, 1, 1) is None
    assert winograd_dilation((8, 8, 3, 3), 1, (1, 2), (1, 2), 1) is None


def test_tiles_count_each_phase_of_a_dilated_map():
    assert tiles((2, 3, 64, 48), 1) == 2 * 16 * 12
    assert tiles((1, 3, 65, 48), 1) == 17 * 12  # a partial tile counts
    assert tiles((1, 3, 64, 64), 4) == 16 * 4 * 4  # 16 phases of 16 x 16


def test_inference_pays_from_128_channels_and_enough_products_training_from_64_channels_and_64_tiles(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)  # the transforms of PyTorch's operators
    assert min_channels(training=False) == 128
    assert pays_for_input((1, 256, 16, 16), (256, 256, 3, 3), 1, training=False)  # 16 tiles x 2^16
    assert 16 * 128 * 128 < MIN_INFERENCE_PRODUCTS
    assert not pays_for_input((1, 128, 16, 16), (128, 128, 3, 3), 1, training=False)
    assert not pays_for_input((1, 64, 128, 128), (64, 64, 3, 3), 1, training=False)
    assert pays_for_input((1, 64, 128, 128), (64, 64, 3, 3), 1, training=True)
    assert pays_for_input((4, 512, 16, 16), (512, 512, 3, 3), 1, training=True)  # 64 tiles
    assert not pays_for_input((4, 512, 8, 8), (512, 512, 3, 3), 1, training=True)  # 16 tiles
    assert not pays_for_input((4, 32, 128, 128), (32, 32, 3, 3), 1, training=True)
    assert not pays_for_input((16, 64, 16, 16), (64, 64, 3, 3), 1, training=True)  # 256 tiles but 2^20 products
    assert pays_for_input((4, 128, 32, 32), (128, 128, 3, 3), 1, training=True)  # 256 tiles, 2^22


def test_native_transforms_pay_from_64_channels_in_inference_16_in_training_and_fewer_products(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built
    monkeypatch.setattr(rule, "_has_avx512", lambda: False)  # the AVX2 processor measured
    assert min_channels(training=False) == 64
    assert pays_for_input((1, 64, 128, 128), (64, 64, 3, 3), 1, training=False)
    assert pays_for_input((1, 64, 16, 16), (64, 64, 3, 3), 1, training=False)  # 16 tiles x 2^12
    assert not pays_for_input((1, 64, 8, 8), (64, 64, 3, 3), 1, training=False)  # 4 tiles
    assert pays_for_input((1, 128, 16, 16), (128, 128, 3, 3), 1, training=False)
    assert pays_for_input((1, 512, 2, 2), (512, 512, 3, 3), 1, training=False)  # one tile x 2^18
    assert not pays_for_input((1, 32, 256, 256), (32, 32, 3, 3), 1, training=False)
    assert min_channels(training=True) == 16
    assert pays_for_input((4, 16, 512, 512), (21, 16, 3, 3), 1, training=True)
    assert not pays_for_input((4, 8, 512, 512), (8, 8, 3, 3), 1, training=True)
    assert not pays_for_input((16, 64, 16, 16), (64, 64, 3, 3), 1, training=True)  # 256 tiles, 2^20 products
    assert pays_for_input((4, 32, 256, 256), (32, 32, 3, 3), 1, training=True)  # 2^24 products
    assert not pays_for_input((4, 512, 8, 8), (512, 512, 3, 3), 1, training=True)  # 16 tiles


def test_on_avx512_float32_training_takes_winograd_from_32_channels(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(rule, "_has_avx512", lambda: True)
    assert min_channels(training=True) == 32 and min_channels(training=False) == 16  # the one-pass F(4x4)'s
    assert not pays_for_input((4, 16, 512, 512), (21, 16, 3, 3), 1, training=True)  # U-Net's head
    assert not pays_for_input((4, 32, 256, 256), (16, 32, 3, 3), 1, training=True)
    assert pays_for_input((4, 32, 256, 256), (32, 32, 3, 3), 1, training=True)
    assert pays_for_input((1, 64, 128, 128), (64, 64, 3, 3), 1, training=False)  # inference unchanged


def test_maps_that_fill_their_tiles_poorly_pay_only_from_256_channels():
    # A mask head's 14 x 14 RoIs fill 196 of their 256 tile outputs.
    for training in (False, True):
        assert not pays_for_input((200, 128, 14, 14), (128, 128, 3, 3), 1, training=training)
        assert pays_for_input((200, 256, 14, 14), (256, 256, 3, 3), 1, training=training)
        assert pays_for_input((50, 128, 28, 28), (128, 128, 3, 3), 1, training=training)  # whole tiles
    assert not pays_for_input((200, 128, 7, 7), (128, 128, 3, 3), 1, training=False)
    # Dilated maps are counted per phase: 64 x 64 at dilation 4 is 16 x 16 per phase, whole tiles.
    assert pays_for_input((1, 128, 64, 64), (128, 128, 3, 3), 4, training=False)


def test_six_by_six_tiles_where_they_fill_the_map_four_by_four_elsewhere():
    assert tiles((1, 3, 64, 64), 1, tile=6) == 11 * 11
    for training in (False, True):
        assert output_tile((4, 128, 64, 64), (128, 128, 3, 3), 1, training) == 6  # 64 of 66: 94% filled
        assert output_tile((4, 256, 32, 32), (256, 256, 3, 3), 1, training) == 4  # 32 of 36: 79%
        assert output_tile((4, 256, 64, 64), (256, 256, 3, 3), 2, training) == 4  # phases of 32 x 32
        assert output_tile((50, 128, 28, 28), (128, 128, 3, 3), 1, training) == 4  # 28 of 30: 87%
        assert output_tile((4, 8, 128, 128), (8, 8, 3, 3), 1, training) is None  # does not pay
    assert output_tile((4, 64, 128, 128), (64, 64, 3, 3), 1, training=True) == 6


def test_bf16_takes_f2x2_for_the_wider_convolutions_only(monkeypatch):
    import torch

    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built
    monkeypatch.setattr(rule, "_has_amx", lambda: False)

    def tile(in_channels, out_channels, size=16, dtype=torch.bfloat16, training=False, weight_dtype=None):
        x = torch.zeros(1, in_channels, size, size, dtype=dtype)
        weight = torch.zeros(out_channels, in_channels, 3, 3, dtype=weight_dtype or dtype)
        return call_output_tile(x, weight, 1, training)

    assert tile(512, 512) == BF16_TILE == 2
    assert tile(768, 256) == 2 and tile(256, 512) == 2 and tile(256, 256) == 2
    assert tile(256, 256, size=4) == 2  # 4 tiles: 1.12x measured
    # 128 channels from 64 tiles (16 x 16: 1.08-1.20x measured; 8 x 8 0.86x), 64 never (0.79-1.09x)
    assert tile(384, 128) == 2 and tile(128, 256) == 2 and tile(128, 128) == 2
    assert tile(128, 128, size=14) is None and tile(128, 256, size=8) is None
    assert tile(64, 64) is None and tile(64, 64, size=128) is None and tile(64, 128, size=64) is None
    assert tile(512, 512, training=True) is None  # training's bf16 is autocast's
    assert tile(512, 512, weight_dtype=torch.float32) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert tile(512, 512) is None  # autocast in inference: not measured, direct
        # Training under autocast, whatever the input's dtype: from 256 tiles for 256 channels and
        # more (1.17-1.30x measured there, 1.08x on 128 and 0.84x on 64), from 512 below (128
        # channels on 256 tiles 1.06x).
        assert tile(256, 256, size=46, dtype=torch.float32, training=True) == 2  # 23 x 23 tiles: 529
        assert tile(512, 512, size=32, training=True) == 2 and tile(512, 512, size=30, training=True) is None
        assert tile(128, 128, size=46, training=True) == 2 and tile(128, 128, size=44, training=True) is None
        assert tile(64, 64, size=64, training=True) is None
    with torch.autocast("cpu", torch.float16):
        assert tile(512, 512, size=64, dtype=torch.float32, training=True) is None
    assert tile(512, 512, size=32, dtype=torch.float32) == 4  # float32 keeps its own rule
    assert tile(512, 512, dtype=torch.float16) is None
    monkeypatch.setattr(rule, "_has_amx", lambda: True)  # oneDNN's AMX kernel: not measured, direct
    assert tile(512, 512) is None
    monkeypatch.setattr(rule, "_has_amx", lambda: False)
    monkeypatch.setattr(native, "available", lambda: False)  # the operators' transforms do not pay
    assert tile(512, 512) is None


def test_float32_inference_takes_f2x2_where_f4x4s_products_wait_on_their_filters(monkeypatch):
    import torch

    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built

    def tile(channels, size, batch=1, training=False, dilation=1):
        x, weight = torch.zeros(batch, channels, size, size), torch.zeros(channels, channels, 3, 3)
        return call_output_tile(x, weight, dilation, training)

    assert filter_bound((1, 512, 16, 16), (512, 512, 3, 3), 1)
    assert tile(512, 16) == tile(512, 8) == tile(512, 4) == 2  # 16, 4 and 1 tiles: 1.22-1.58x measured
    assert tile(512, 32) == 4 and tile(512, 16, batch=8) == 4  # 64 and 128 tiles: 0.60-0.62x
    assert tile(256, 16) == 4  # 4x smaller filters: F(4x4) won 1.26x
    assert tile(512, 16, training=True) is None  # training keeps its rule (16 tiles: direct)
    assert tile(512, 32, dilation=2) == 4  # 4 phases of 16 x 16: 64 tiles
    monkeypatch.setattr(native, "available", lambda: False)  # the operators' transforms: not measured
    assert tile(512, 16) == 4
    # The decoder's grid is F(4x4)'s or F(6x6)'s only (no F(2x2) kernels for it).
    monkeypatch.setattr(native, "available", lambda: True)
    assert upsampling_output_tile(torch.empty(1, 512, 8, 8), torch.empty(512, 1024, 3, 3), training=False) == 4


def test_a_decoder_step_takes_winograd_on_the_upsampled_grid_from_128_channels(monkeypatch):
    import torch

    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(rule, "_has_avx512", lambda: True)
    x, weight = torch.empty(1, 512, 16, 16), torch.empty(256, 768, 3, 3)  # U-Net-R34's first step
    assert upsampling_output_tile(x, weight, training=False) == 4  # 32 x 32: F(6x6) would fill 79%
    assert upsampling_output_tile(torch.empty(1, 256, 32, 32), torch.empty(128, 384, 3, 3), training=False) == 6
    assert upsampling_output_tile(torch.empty(4, 512, 16, 16), weight, training=True) == 4
    # Fewer channels in x or out keep the transposed convolution (measured slower there).
    assert upsampling_output_tile(torch.empty(1, 128, 64, 64), torch.empty(64, 192, 3, 3), training=False) is None
    assert upsampling_output_tile(torch.empty(1, 64, 32, 32), torch.empty(256, 320, 3, 3), training=False) is None
    # Too few tiles for training's products, bf16, autocast, no native transforms: None.
    assert upsampling_output_tile(torch.empty(1, 512, 8, 8), weight, training=True) is None
    assert upsampling_output_tile(x.bfloat16(), weight.bfloat16(), training=False) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert upsampling_output_tile(x, weight, training=False) is None
    monkeypatch.setattr(native, "available", lambda: False)
    assert upsampling_output_tile(x, weight, training=False) is None


def test_float32_inference_takes_the_one_pass_f4x4_for_few_channels_on_avx512(monkeypatch):
    from seglab.engine.winograd import fused_pays

    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built
    monkeypatch.setattr(rule, "_has_avx512", lambda: True)

    def pays(in_channels, out_channels, size=128, batch=1, dilation=1):
        return fused_pays((batch, in_channels, size, size), (out_channels, in_channels, 3, 3), dilation)

    assert pays(32, 32, 256) and pays(64, 32, 256) and pays(64, 64) and pays(128, 64)  # 1.53-2.06x measured
    assert pays(16, 32, 256) and pays(32, 16, 512)  # 1.22-1.23x
    assert pays(64, 64, size=16) and pays(32, 32, size=8)  # small maps too: one call, no passes
    assert not pays(16, 16, 512)  # a tie with the direct convolution (1.00-1.03x)
    assert not pays(128, 128, 64) and not pays(96, 96, 64)  # the separate passes' products win
    assert not pays(16, 21, 512)  # output channels in whole vectors only
    assert not pays(64, 64, 128, dilation=2)  # undilated only
    assert min_channels(training=False) == 16
    for training in (False, True):  # training keeps its rule (the one pass has no backward)
        tile = output_tile((1, 64, 128, 128), (64, 64, 3, 3), 1, training)
        assert tile == (4 if not training else 6)
    assert output_tile((1, 32, 256, 256), (32, 32, 3, 3), 1, training=False) == 4
    assert output_tile((1, 16, 512, 512), (16, 16, 3, 3), 1, training=False) is None
    monkeypatch.setattr(rule, "_has_avx512", lambda: False)  # not measured elsewhere: the separate passes' rule
    assert not pays(64, 64) and min_channels(training=False) == 64
    assert output_tile((1, 64, 128, 128), (64, 64, 3, 3), 1, training=False) == 6
    assert output_tile((1, 32, 256, 256), (32, 32, 3, 3), 1, training=False) is None


def test_large_dilations_take_the_tile_that_saves_most_over_the_windows(monkeypatch):
    from seglab.engine.winograd import MIN_ATROUS_SAVING, atrous_output_tile

    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built

    def tile(size, dilation, in_channels=2048, out_channels=256, batch=1):
        return atrous_output_tile((batch, in_channels, size, size), (out_channels, in_channels, 3, 3), dilation)

    # DeepLab v3's ASPP at output stride 8 (a 64 x 64 map): at 12 each phase is one 6 x 6 tile
    # (3.1x fewer multiply-adds than the windows, 2.1x faster measured); at 24 and 36 the
    # windows skip most of the padding and win.
    assert tile(64, 12) == 6 and tile(64, 12, batch=8) == 6 and tile(64, 12, 128, 128) == 6
    assert tile(64, 24) == 3  # phases of 2-3 pixels: one 3 x 3 tile each, 1.44x fewer
    assert tile(64, 36) is None  # phases of 1-2 pixels: the windows skip most of the padding
    assert tile(64, 18) == 4  # 2.1x fewer with F(4x4), 1.2x with F(6x6) or F(3x3)
    assert tile(32, 6) == 6 and tile(32, 12) == 3 and tile(32, 18) is None  # output stride 16
    assert MIN_ATROUS_SAVING > 1.17  # F(6x6) at 18 on 64 x 64 saved that much and ran 0.81x
    assert tile(64, 12, 32, 32) is None  # too few channels for the separate passes' transforms
    monkeypatch.setattr(native, "available", lambda: False)
    assert tile(64, 12) is None


def test_bf16_large_dilations_take_f2x2_where_its_products_are_fewest(monkeypatch):
    import torch

    from seglab.engine.winograd import atrous_bf16_pays, atrous_call_tile

    monkeypatch.setattr(native, "available", lambda: True)  # the rule only, nothing is built
    monkeypatch.setattr(rule, "_has_amx", lambda: False)

    def pays(size, dilation, in_channels=2048, out_channels=256, batch=1):
        return atrous_bf16_pays((batch, in_channels, size, size), (out_channels, in_channels, 3, 3), dilation)

    # DeepLab v3's ASPP: at 12 on 64 x 64 each phase is 3 x 3 tiles of F(2x2), 1.37x fewer products
    # than the windows (1.58-1.67x faster measured than the all-taps product); at 24 and 36 the
    # windows skip most of the padding (0.61x measured at 24).
    assert pays(64, 12) and pays(64, 12, batch=8) and pays(64, 12, 512) and pays(32, 6)
    assert not pays(64, 24) and not pays(64, 36) and not pays(32, 12)
    assert not pays(64, 12, 64, 64)  # too few channels for bf16's F(2x2)
    x = torch.zeros(1, 2048, 64, 64, dtype=torch.bfloat16)
    assert atrous_call_tile(x, (256, 2048, 3, 3), (12, 12)) == BF16_TILE
    assert atrous_call_tile(x, (256, 2048, 3, 3), (24, 24)) is None
    assert atrous_call_tile(x.half(), (256, 2048, 3, 3), (12, 12)) is None
    with torch.autocast("cpu", torch.bfloat16):
        assert atrous_call_tile(x, (256, 2048, 3, 3), (12, 12)) is None  # inference's bf16 only
    monkeypatch.setattr(rule, "_has_amx", lambda: True)  # oneDNN's AMX kernel: not measured
    assert not pays(64, 12)


def test_an_empty_batch_takes_the_direct_convolution():
    # Mask R-CNN's mask head on an image without detections: 0 RoIs, no tile to divide by
    import torch

    weight = torch.zeros(256, 256, 3, 3)
    for dtype in (torch.float32, torch.bfloat16):
        for training in (False, True):
            assert call_output_tile(torch.zeros(0, 256, 14, 14, dtype=dtype), weight.to(dtype), 1, training) is None


def test_the_fast_path_runs_an_empty_batch():
    import torch

    from seglab.engine.fastpath import optimize_for_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.BatchNorm2d(256), torch.nn.ReLU(),
                              torch.nn.Conv2d(256, 4, 1)).eval()
    for precision in ("32", "bf16"):
        fast = optimize_for_inference(net, precision)
        with torch.no_grad():
            assert fast(torch.zeros(0, 256, 14, 14)).shape == (0, 4, 14, 14)
