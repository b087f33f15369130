"""Which precision `auto` picks, and what an explicit request does, on each kind of processor."""
import pytest
import torch

from seglab.engine.precision import (
    EMULATED_BF16,
    auto_precision,
    cpu_has,
    cpu_runs_bf16,
    cpu_supports_bf16,
    resolve_precision,
)

CPU = torch.device("cpu")


@pytest.fixture
def processor(monkeypatch):
    """Pretends to be a processor with the given bfloat16 support: "native" (AVX-512 BF16),
    "amx", "emulated" (AVX-512 without BF16: oneDNN converts) or "none" (no oneDNN bfloat16)."""

    def pretend(kind: str) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kind != "none")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: kind == "native")
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: kind == "amx")
        for probe in (cpu_has, cpu_runs_bf16, cpu_supports_bf16):
            probe.cache_clear()

    yield pretend
    for probe in (cpu_has, cpu_runs_bf16, cpu_supports_bf16):
        probe.cache_clear()


@pytest.mark.parametrize("kind", ["native", "amx"])
def test_auto_takes_bf16_where_the_processor_multiplies_it(processor, kind):
    processor(kind)
    assert cpu_supports_bf16() and auto_precision(CPU) == "bf16"
    assert resolve_precision("auto", CPU).dtype == torch.bfloat16


def test_auto_keeps_float32_where_bf16_would_be_emulated_and_an_explicit_bf16_warns(processor):
    processor("emulated")
    assert cpu_runs_bf16() and not cpu_supports_bf16()
    assert auto_precision(CPU) == "32" and resolve_precision("auto", CPU).dtype is None
    with pytest.warns(RuntimeWarning, match="no AVX-512 BF16 or AMX") as warned:
        chosen = resolve_precision("bf16", CPU)
    assert chosen.dtype == torch.bfloat16 and str(warned[0].message) == EMULATED_BF16


def test_bf16_is_refused_where_onednn_has_none(processor):
    processor("none")
    assert not cpu_runs_bf16() and not cpu_supports_bf16() and auto_precision(CPU) == "32"
    with pytest.raises(ValueError, match="--precision bf16: this CPU has no bfloat16 support"):
        resolve_precision("bf16", CPU)


def test_the_bench_calibrates_emulated_bf16_too_and_says_which(processor):
    from seglab.bench import calibration_kernels, machine_description

    processor("emulated")
    assert set(calibration_kernels(CPU, 32)) == {"fp32", "bf16"}
    description = machine_description()
    assert description["cpu_bf16"] is False and description["cpu_bf16_emulated"] is True
    processor("none")
    assert set(calibration_kernels(CPU, 32)) == {"fp32"}


def test_the_program_prints_a_warning_on_one_line():
    from seglab.cli import _one_line_warning

    assert _one_line_warning(RuntimeWarning(EMULATED_BF16), RuntimeWarning, "x.py", 3) == \
        f"seglab: warning: {EMULATED_BF16}\n"
